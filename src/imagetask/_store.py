"""Every SQL statement imagetask runs: schema, migrations, and each state transition.

One writer connection per process and one reader connection, both aiosqlite. A write
transaction is one Python function run whole on the writer's thread (one hop, not one
per statement), opened with ``BEGIN IMMEDIATE``. Two more plain sqlite3 connections live
on the event loop's thread: one for point reads, one for small writes (submits, cancels,
grants) while the writer is idle (no hop at all; see `Store._write_small`). Every
transition of a task is a single guarded ``UPDATE ... WHERE status = ? AND attempt = ?
RETURNING``: callers act only on what comes back, so a worker that lost its lease cannot
overwrite anything.

The SQL stays portable to PostgreSQL: RETURNING, partial indexes, ON CONFLICT, no
SQLite-only functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite
import attrs

from . import _config
from ._dbcheck import check_database
from ._exceptions import ImageTaskError, InsufficientCredits, StoreError, ValidationError
from ._models import StoredImage, Task, TaskError, TaskEvent, TaskList, now_ms

if TYPE_CHECKING:
    from .testing import Faults

__all__ = ["Claimed", "Store", "SubmitRow", "is_damage"]

log = logging.getLogger("imagetask")
T = TypeVar("T")


# --- schema -----------------------------------------------------------------------------------
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

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "tasks, images, events, accounts, ledger", _V1),
    (2, "tasks.released: attempts handed back at shutdown", _V2),
    (3, "tasks_status index: reads by status, newest first", _V3),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

# --- records passed between the store and the worker -------------------------------------------


@attrs.define
class SubmitRow:
    """Everything a submit writes for one task (validated, priced, references copied)."""

    id: str
    owner: str
    prompt: str
    model: str
    params: dict[str, Any]
    max_attempts: int
    cost: int
    charge: bool
    idempotency_key: str | None
    #: Hash of the request, kept only with an idempotency key (to compare re-submits).
    fingerprint: str | None
    metadata_json: str
    #: The stored copies of the reference images.
    references: tuple[StoredImage, ...] = ()
    #: ``params`` as stored (sorted-key JSON), when the caller has it already.
    params_json: str | None = None


@attrs.frozen
class Claimed:
    """A task a worker just claimed, with what it needs to run one attempt."""

    id: str
    owner: str
    prompt: str
    model: str
    params: dict[str, Any]
    attempt: int
    max_attempts: int
    references: tuple[StoredImage, ...]
    #: How many earlier attempts were handed back at a clean close (they do not count).
    released: int = 0
    #: How many earlier attempts ended in a retry, by error code (for per-code retry limits).
    retries: Mapping[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Submitted:
    """The outcome of one submit: the task id, whether this call created it, and when."""

    id: str
    created: bool
    at: int


class _Busy(enum.Enum):
    BUSY = "busy"


#: What `Store.get_now` returns when the read would have to wait for a lock.
BUSY = _Busy.BUSY


# --- the store ----------------------------------------------------------------------------------


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
        self._root_prefix = os.path.join(str(images_root), "")
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
            self._inline = self._connect_inline()
            if self.durability == "normal":
                self._fast = self._connect_fast()
        except BaseException:
            await self.close()
            raise

    async def _connect(self, *, query_only: bool) -> aiosqlite.Connection:
        conn = aiosqlite.connect(self.path, isolation_level=None, check_same_thread=False)
        _daemonize(conn)
        try:
            await conn
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot open the database {self.path}: {exc}; check that its folder exists, is "
                "writable, and is not a dangling link"
            ) from None
        try:
            conn.row_factory = sqlite3.Row
            await self._run(conn, self._configure, query_only)
        except BaseException:
            await conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection, query_only: bool) -> None:
        conn.execute("PRAGMA busy_timeout = 10000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"{self.path}: could not switch to WAL journal mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys = ON")
        if query_only:
            conn.execute("PRAGMA query_only = ON")
        else:
            # The store checkpoints itself, mostly off the writer (see `_run_checkpoint`);
            # SQLite's own checkpoint in the committing writer stays only as a safety net.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_SAFETY_CHECKPOINT_PAGES}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "schema_migrations" not in tables:
                if tables - {"sqlite_sequence"}:
                    raise StoreError(
                        f"{self.path} is an SQLite database but not an imagetask one "
                        f"(it has tables {', '.join(sorted(tables))}); pass another path"
                    )
                conn.execute(
                    "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                    " description TEXT NOT NULL, applied_at INTEGER NOT NULL)"
                )
            current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {current}, newer than this imagetask "
                    f"understands ({SCHEMA_VERSION}); upgrade imagetask to open it"
                )
            for version, description, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    (version, description, _now()),
                )
                log.info("migrated %s to schema version %d", self.path, version)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connect_inline(self) -> sqlite3.Connection:
        """The point-read connection, used only on the thread that opened the store.

        It never waits for a lock (busy_timeout 0): in WAL mode a read takes no lock a
        writer holds, so it answers in microseconds; in the rare moments it would have to
        wait (a WAL reset or recovery), the read goes to the threaded reader instead, so the
        event loop is never blocked on another process.
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 0")
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _connect_fast(self) -> sqlite3.Connection:
        """The small-write connection, used only on the thread that opened the store.

        ``busy_timeout`` 0: when another connection holds the write lock, the write goes to
        the threaded writer (which may wait) instead of blocking the event loop. Automatic
        checkpoints are off here (one would copy pages and fsync on the loop's thread); the
        store runs its own (see `_run_checkpoint`).
        """
        conn = sqlite3.connect(self.path, isolation_level=None)
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

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in one read transaction (one consistent snapshot) on the reader."""
        if self._reader is None:
            raise StoreError("the store is closed")
        return await self._run(self._reader, _read_transaction, fn, *args)

    # -- submit --

    async def submit(self, rows: Sequence[SubmitRow], *, atomic: bool) -> list[Submitted | ImageTaskError]:
        """Insert tasks in one transaction, a savepoint each.

        With ``atomic`` the first error rolls everything back and is raised; otherwise
        each row succeeds or fails on its own and its error is returned in its place.
        ``created_at`` is the time inside the transaction (`Submitted.at`).
        """
        refs = [[_image_row(r.id, "reference", 0, self._rel(im), im) for im in r.references] for r in rows]
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
    ) -> tuple[list[Claimed], list[str], int | None]:
        """Take back expired leases, then claim up to ``limit`` runnable tasks.

        Args:
            worker: The claiming worker's id.
            limit: Most tasks to claim.
            per_owner: Most running tasks one owner may have (across every process).
            lease: Seconds the new leases last, from the moment the transaction runs.
            held: (id, attempt) of the attempts this worker is running: an expired lease
                among them is renewed, not taken back (a live worker that stalled, say a
                blocked loop or a SIGSTOP, keeps its own work).
            gone: Tells whether the holder of a running task (a worker id) is provably
                gone; those leases are taken back at once, expired or not. None: only
                expired leases are taken back.

        Returns:
            (claimed tasks, ids that became terminal while reaping, the earliest
            ``run_after`` still queued in ms, or None).
        """
        raw, ended, next_run = await self._write(
            _claim, worker, limit, per_owner, int(lease * 1000), frozenset(held), gone
        )
        claimed = [
            Claimed(
                id=row["id"],
                owner=row["owner"],
                prompt=row["prompt"],
                model=row["model"],
                params=json.loads(row["params"]),
                attempt=row["attempt"],
                max_attempts=row["max_attempts"],
                released=row["released"],
                references=tuple(self._image(r) for r in refs),
                retries=retries,
            )
            for row, refs, retries in raw
        ]
        return claimed, ended, next_run

    async def heartbeat(self, worker: str, held: Sequence[tuple[str, int]], lease: float) -> set[str]:
        """Renew the leases of ``held`` (id, attempt) pairs; return the ids still held."""
        if not held:
            return set()
        return await self._write(_heartbeat, worker, held, int(lease * 1000))

    async def succeed(self, task_id: str, attempt: int, worker: str, images: Sequence[StoredImage]) -> bool:
        """Mark an attempt succeeded with its images; False if the attempt lost its claim."""
        rows = [_image_row(task_id, "output", attempt, self._rel(im), im) for im in images]
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
        return await self._read(_balance, owner)

    # -- reads --

    async def get(self, task_id: str) -> Task | None:
        """One task by id, or None: one statement, served on the loop's thread when possible."""
        task = self.get_now(task_id)
        if task is BUSY:  # let the threaded reader wait for the lock
            rows = await self._read(_get_one, task_id)
            return self._task_from_join(rows) if rows else None
        return task

    def get_now(self, task_id: str) -> Task | _Busy | None:
        """`get` on the loop's thread, without waiting: ``BUSY`` if SQLite says it would
        have to wait (then call `get`)."""
        if self._inline is None:
            raise StoreError("the store is closed")
        try:
            rows = self._inline.execute(_GET_ONE, (task_id,)).fetchall()
        except sqlite3.OperationalError:  # busy or locked
            return BUSY
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        return self._task_from_join(rows) if rows else None

    async def pending(self, owner: str | None) -> list[Task]:
        """Queued and running tasks, newest first."""
        sql, args = pending_sql(owner)
        return self._tasks(await self._read(_select_tasks, sql, args))

    async def list_tasks(
        self, owner: str | None, status: str | None, limit: int, before: str | None
    ) -> list[Task]:
        """Tasks newest first, filtered, one page of ``limit`` ids lower than ``before``."""
        sql, args = list_sql(owner, status, limit, before)
        return self._tasks(await self._read(_select_tasks, sql, args))

    async def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """The status of each of ``ids`` that exists, read in one snapshot."""
        return await self._read(_statuses, list(ids))

    async def terminal_among(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are in a terminal state (or gone)."""
        ids = list(ids)
        found = await self.statuses(ids)
        return {i for i in ids if found.get(i) not in _ACTIVE}

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on the point-read connection: it changes when
        another connection commits. A pragma read takes no lock, so it runs inline."""
        if self._inline is None:
            raise StoreError("the store is closed")
        try:
            return int(self._inline.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    async def own_versions(self) -> tuple[int, ...]:
        """``PRAGMA data_version`` on each of this store's write connections.

        A connection's data_version moves only when *another* connection commits. With two
        writers here (the threaded one, and the fast one on the loop's thread), a commit
        from another process (or another manager) moves both; this store's own commits
        each move only the other one. So if either value is unchanged since an earlier
        call, no foreign commit happened in between.
        """
        if self._writer is None:
            raise StoreError("the store is closed")
        threaded = await self._run(self._writer, _data_version)
        if self._fast is None:
            return (threaded,)
        try:
            return (threaded, _data_version(self._fast))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    async def events(self, task_id: str) -> list[TaskEvent]:
        """The event log of one task, oldest first."""
        return await self._read(_events, task_id)

    async def health(self) -> dict[str, Any]:
        """What `TaskManager.health` reports: schema version, integrity, WAL size, counts."""
        found = await self._read(_health, _now())
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
        return await self._read(_file_state, list(task_ids))

    # -- row decoding --

    def _rel(self, image: StoredImage) -> str:
        path = str(image.path)
        prefix = self._root_prefix
        if path.startswith(prefix):  # always, for files this store wrote: skip pathlib's parsing
            return path[len(prefix) :].replace(os.sep, "/")
        return image.path.relative_to(self.images_root).as_posix()

    def _tasks(self, result: tuple[list[sqlite3.Row], list[sqlite3.Row]]) -> list[Task]:
        rows, image_rows = result
        outputs: dict[str, list[StoredImage]] = {}
        refs: dict[str, list[StoredImage]] = {}
        for r in image_rows:
            (outputs if r["role"] == "output" else refs).setdefault(r["task_id"], []).append(self._image(r))
        return TaskList(Task._from_row(row, outputs.get(row[0], ()), refs.get(row[0], ())) for row in rows)

    def _task_from_join(self, rows: list[tuple[Any, ...]]) -> Task:
        """Build a Task from `_GET_ONE` rows: the task's columns, then one image per row."""
        first = rows[0]
        outputs: list[StoredImage] = []
        refs: list[StoredImage] = []
        if first[_N_TASK_COLUMNS] is not None:
            root = self.images_root
            for r in rows:
                (role, idx, path, mime, width, height, sha256, size, provenance) = r[_N_TASK_COLUMNS:]
                image = StoredImage(
                    root / path, mime, width, height, sha256, size, idx,
                    json.loads(provenance) if provenance != "{}" else {},
                )  # fmt: skip
                (outputs if role == "output" else refs).append(image)
        return Task._from_row(first, outputs, refs)

    def _image(self, r: sqlite3.Row) -> StoredImage:
        return StoredImage(
            path=self.images_root / r["path"],
            mime=r["mime"],
            width=r["width"],
            height=r["height"],
            sha256=r["sha256"],
            size=r["size"],
            index=r["idx"],
            provenance=json.loads(r["provenance"]),
        )


def _daemonize(conn: aiosqlite.Connection) -> None:
    """Make a connection's thread a daemon before it starts, so a manager that is never
    closed does not keep the process alive at exit (Python waits for every other thread).
    Ending a daemon thread mid-transaction is safe: SQLite rolls it back, as after a crash.
    aiosqlite keeps its thread private (``_thread``; before 0.21 the connection was the
    thread itself): this is the second private name we rely on, pinned in pyproject.toml."""
    thread: threading.Thread = getattr(conn, "_thread", None) or conn  # type: ignore[assignment]
    thread.daemon = True


# --- functions run on the connection thread ------------------------------------------------------


_now = now_ms


_Queued = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


def _coalesce(
    batch: list[_Queued],
) -> tuple[
    list[tuple[Callable[..., Any], tuple[Any, ...]]], list[tuple[list[asyncio.Future[Any]], list[int] | None]]
]:
    """Merge runs of non-atomic submits into one bulk submit (rows with no key and no charge
    are then inserted with executemany); other operations pass through one by one.

    Returns the operations to run and, for each, the futures to answer and (for a merged
    submit) how many result rows belong to each future.
    """
    ops: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    waiters: list[tuple[list[asyncio.Future[Any]], list[int] | None]] = []
    for fn, args, fut in batch:
        mergeable = fn is _submit_rows and not args[1]
        if mergeable and ops and ops[-1][0] is _submit_rows and waiters[-1][1] is not None:
            rows, _ = ops[-1][1]
            ops[-1] = (_submit_rows, ([*rows, *args[0]], False))
            waiters[-1][0].append(fut)
            waiters[-1][1].append(len(args[0]))
            continue
        ops.append((fn, args))
        waiters.append(([fut], [len(args[0])] if mergeable else None))
    return ops, waiters


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any, path: Path) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    elif isinstance(value, sqlite3.DatabaseError):
        fut.set_exception(StoreError(f"{path}: {value}"))
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


def _batch(
    conn: sqlite3.Connection,
    ops: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]],
    faults: Faults | None,
) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        if len(ops) == 1:  # nothing to isolate it from: the transaction is its savepoint
            fn, args = ops[0]
            try:
                if faults is not None:
                    faults.before(_OPERATIONS[fn])
                outcomes.append((True, fn(conn, *args)))
            except ImageTaskError as exc:
                conn.execute("ROLLBACK")
                return [(False, exc)]
        else:
            for fn, args in ops:
                conn.execute("SAVEPOINT op")
                try:
                    if faults is not None:
                        faults.before(_OPERATIONS[fn])
                    outcomes.append((True, fn(conn, *args)))
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
            error = faults.after_commit(_OPERATIONS[fn])
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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED (any extended code): another connection has the lock."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (5, 6)


def _read_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
    conn.execute("BEGIN")
    try:
        return fn(conn, *args)
    finally:
        conn.execute("COMMIT")


_TASK_COLUMNS = Task._COLUMNS
_N_TASK_COLUMNS = len(_TASK_COLUMNS)
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
        json.dumps(dict(im.provenance), sort_keys=True, default=str),
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
    if plain:
        conn.execute("SAVEPOINT submit_plain")
        try:
            inserted = _insert_plain(conn, [rows[i] for i in plain], now)
        except Exception:
            conn.execute("ROLLBACK TO submit_plain")
            conn.execute("RELEASE submit_plain")
            if atomic:
                raise
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
    """Whether a submit can fail on its own: a key may be taken, a balance may be short."""
    return row.idempotency_key is not None or (row.charge and row.cost > 0)


def _insert_plain(
    conn: sqlite3.Connection, rows: Sequence[tuple[SubmitRow, list[tuple[Any, ...]]]], now: int
) -> list[Submitted]:
    """Rows with no key and no charge: nothing to look up, so insert them in bulk."""
    conn.executemany(_INSERT_TASK, [_task_values(row, now) for row, _ in rows])
    images = [ref for _, refs in rows for ref in refs]
    if images:
        conn.executemany(_INSERT_IMAGE, images)
    return [Submitted(row.id, created=True, at=now) for row, _ in rows]


_INSERT_TASK = (
    "INSERT INTO tasks (id, owner, prompt, model, params, status, attempt, max_attempts, cost, refs,"
    " idempotency_key, fingerprint, metadata, run_after, created_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _params_json(params: Mapping[str, Any]) -> str:
    """The stored JSON of a task's params (few distinct values: cached when hashable)."""
    try:
        return _params_json_of(tuple(sorted(params.items())))
    except TypeError:  # an unhashable value
        return json.dumps(params, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _params_json_of(items: tuple[tuple[str, Any], ...]) -> str:
    return json.dumps(dict(items), sort_keys=True)


def _task_values(row: SubmitRow, now: int) -> tuple[Any, ...]:
    return (
        row.id, row.owner, row.prompt, row.model, row.params_json or _params_json(row.params),
        row.max_attempts, row.cost, len(row.references), row.idempotency_key, row.fingerprint,
        row.metadata_json,
        now, now, now,
    )  # fmt: skip


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


_CLAIM = """
UPDATE tasks
   SET status = 'running', attempt = attempt + 1, worker = :worker, lease_until = :lease_until,
       started_at = coalesce(started_at, :now), updated_at = :now
 WHERE status = 'queued'
   AND id = (
       SELECT t.id FROM tasks t INDEXED BY tasks_queue
        WHERE t.status = 'queued' AND t.run_after <= :now
          AND (SELECT count(*) FROM tasks r INDEXED BY tasks_running
                WHERE r.owner = t.owner AND r.status = 'running') < :per_owner
        ORDER BY t.run_after, t.id
        LIMIT 1)
RETURNING id, owner, prompt, model, params, attempt, max_attempts, released, refs
"""


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
) -> tuple[list[tuple[sqlite3.Row, list[sqlite3.Row], dict[str, int]]], list[str], int | None]:
    now = _now()  # inside the transaction: waiting for the lock never shortens a lease
    ended = _reap(conn, now, worker, lease_ms, held, gone)
    claimed: list[tuple[sqlite3.Row, list[sqlite3.Row], dict[str, int]]] = []
    args = {"worker": worker, "lease_until": now + lease_ms, "now": now, "per_owner": per_owner}
    # One task per statement, so each claim sees the running count the previous one left.
    while len(claimed) < limit:
        row = conn.execute(_CLAIM, args).fetchone()
        if row is None:
            break
        refs = []
        if row["refs"]:  # most tasks have none: skip the lookup
            refs = conn.execute(
                "SELECT * FROM task_images WHERE task_id = ? AND role = 'reference' ORDER BY idx",
                (row["id"],),
            ).fetchall()
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


_GUARD = " WHERE id = ? AND attempt = ? AND status = 'running' AND worker = ? RETURNING id"


def _succeed(
    conn: sqlite3.Connection, task_id: str, attempt: int, worker: str, rows: list[tuple[Any, ...]]
) -> bool:
    now = _now()
    done = conn.execute(
        "UPDATE tasks SET status = 'succeeded', worker = NULL, lease_until = NULL,"
        " error_code = NULL, error_message = NULL, error_retryable = NULL,"
        " finished_at = ?, updated_at = ?" + _GUARD,
        (now, now, task_id, attempt, worker),
    ).fetchone()
    if done is None:
        return False
    conn.executemany(_INSERT_IMAGE, rows)
    _event(conn, task_id, attempt, "succeeded", "succeeded", now, worker)
    return True


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


def _fail(conn: sqlite3.Connection, task_id: str, attempt: int, worker: str, error: TaskError) -> bool:
    now = _now()
    done = conn.execute(
        "UPDATE tasks SET status = 'failed', worker = NULL, lease_until = NULL, error_code = ?,"
        " error_message = ?, error_retryable = ?, finished_at = ?, updated_at = ?" + _GUARD,
        (error.code, error.message, int(error.retryable), now, now, task_id, attempt, worker),
    ).fetchone()
    if done is None:
        return False
    _refund(conn, task_id, now)
    _event(conn, task_id, attempt, "failed", "failed", now, worker, f"{error.code}: {error.message}")
    return True


def _release(conn: sqlite3.Connection, task_id: str, attempt: int, worker: str) -> bool:
    return _requeue(conn, task_id, attempt, worker, 0, "released", "the worker shut down", released=True)


def _cancel(conn: sqlite3.Connection, task_id: str, reason: str) -> bool:
    now = _now()
    row = conn.execute(
        "UPDATE tasks SET status = 'cancelled', worker = NULL, lease_until = NULL,"
        " error_code = 'cancelled', error_message = ?, error_retryable = 0,"
        " finished_at = ?, updated_at = ?"
        " WHERE id = ? AND status IN ('queued', 'running') RETURNING attempt",
        (reason, now, now, task_id),
    ).fetchone()
    if row is None:
        return False
    _refund(conn, task_id, now)
    _event(conn, task_id, row["attempt"], "cancelled", "cancelled", now, None, reason)
    return True


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


def _balance(conn: sqlite3.Connection, owner: str) -> int:
    row = conn.execute("SELECT balance FROM accounts WHERE owner = ?", (owner,)).fetchone()
    return 0 if row is None else int(row["balance"])


def _select_tasks(
    conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]
) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
    rows = conn.execute(sql, args).fetchall()
    if not rows:
        return rows, []
    if len(rows) == 1:
        images = conn.execute(
            "SELECT * FROM task_images WHERE task_id = ? ORDER BY role, idx", (rows[0]["id"],)
        ).fetchall()
    else:
        ids = [r["id"] for r in rows]
        images = conn.execute(
            f"SELECT * FROM task_images WHERE task_id IN ({','.join('?' * len(ids))}) ORDER BY role, idx",
            ids,
        ).fetchall()
    return rows, images


#: Ids per ``IN (...)`` statement: well under SQLite's variable limit (32,766, or 999 before 3.32).
_IN_CHUNK = 500
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
}
