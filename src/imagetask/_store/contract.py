"""The store contract: every method the manager and the workers may call, and what each promises.

`Store` (SQLite) implements it; a PostgreSQL store will implement it too and run the same
contract tests (``tests/test_store.py::TestStoreContract``, parametrised over the stores).
Every write is one transaction; every transition of a task is one guarded update that
succeeds only for the expected status, attempt (the fencing token) and worker; times are
taken inside the transaction that writes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import ImageTaskError
from .._models import StoredImage, Task, TaskError, TaskEvent
from .records import Changes, Claimed, SubmitRow, Submitted, _WouldWait
from .tokens import TokenRow

if TYPE_CHECKING:
    from ..testing import Faults

__all__ = ["TaskStore"]


class TaskStore(Protocol):
    """What a task store offers. Methods raise `StoreError` when the database refuses, and
    when the store is closed; a store may raise its subclass `StoreClosed` for an operation it
    refused because it was closed (nothing of it written: the manager then deletes a refused
    submit's reference copies without asking the database)."""

    path: Path
    images_root: Path
    #: The test hook (see `imagetask.testing.Faults`); None in production.
    faults: Faults | None

    async def open(self) -> None:
        """Check the database untouched, then connect and run pending migrations.

        Raises `StoreError` for a foreign, damaged or newer database, writing nothing."""

    async def close(self) -> None:
        """Commit and answer the writes already queued, then disconnect (safe twice)."""

    def submit(
        self, rows: Sequence[SubmitRow], *, atomic: bool
    ) -> Awaitable[list[Submitted | ImageTaskError]]:
        """Insert tasks (and their charges and reference rows) in one transaction
        (awaitable: a coroutine function, or a plain one returning a future). An idempotency
        key already used by the owner returns the first task (``created`` false) or a
        `ValidationError` for a different request; a short balance is `InsufficientCredits`.
        ``atomic``: the first error rolls back all and is raised; otherwise each row's error
        stands in its place and only that row is not written."""
        ...

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
        """In one transaction: take back expired leases (and those of provably gone
        holders) except the caller's own ``held`` attempts, which are renewed; then claim up
        to ``limit`` runnable tasks of ``provider`` (tasks submitted for it, and tasks from
        before tasks named one, whose provider is ``""``), oldest first, never past
        ``per_owner`` running for one owner (counted across every worker). Returns (claimed,
        ids that ended while taken back, the earliest ``run_after`` still queued)."""
        ...

    async def heartbeat(self, worker: str, held: Sequence[tuple[str, int]], lease: float) -> set[str]:
        """Renew the leases of ``held`` (id, attempt) that this worker still holds; a full
        lease from the commit. Returns the ids still held."""
        ...

    async def succeed(
        self, task_id: str, attempt: int, worker: str, images: Sequence[StoredImage]
    ) -> Task | None:
        """Fenced: the attempt succeeds with its images. Returns the task as it committed
        (what a `get` right after would read: the waiters get it without a read), or None
        if the attempt no longer holds the task."""
        ...

    async def retry(self, task_id: str, attempt: int, worker: str, error: TaskError, delay: float) -> bool:
        """Fenced: back to the queue, runnable ``delay`` seconds after the commit."""
        ...

    async def fail(self, task_id: str, attempt: int, worker: str, error: TaskError) -> Task | None:
        """Fenced: failed for good, and refunded at most once. Returns the task as it
        committed, or None if the attempt no longer holds the task."""
        ...

    async def release(self, task_id: str, attempt: int, worker: str) -> bool:
        """Fenced: handed back at once; the attempt does not count against max_attempts."""
        ...

    async def cancel(self, task_id: str, reason: str) -> Task | None:
        """Cancel a queued or running task, refunded at most once. Returns the task as it
        committed, or None if it had ended or does not exist."""
        ...

    async def grant(self, owner: str, amount: int) -> int:
        """Add ``amount`` credits (negative takes away); the new balance, within 0..10**12."""
        ...

    async def balance(self, owner: str) -> int:
        """The owner's balance: the sum of its ledger (0 for an unknown owner)."""
        ...

    async def get(self, task_id: str) -> Task | None:
        """One task by id (one consistent read), or None."""
        ...

    def try_get(self, task_id: str) -> Task | _WouldWait | None:
        """`get` without waiting, on the caller's thread: `WOULD_WAIT` when the answer needs
        a wait (a lock, or I/O the store only does asynchronously; a store without a
        synchronous read path always says so). Then await `get`."""
        ...

    async def pending(self, owner: str | None) -> list[Task]:
        """Queued and running tasks, newest first, through an index of active rows only."""
        ...

    async def list_tasks(
        self, owner: str | None, status: str | None, limit: int, before: str | None
    ) -> list[Task]:
        """One page of tasks, newest first, ids below ``before``; an index in id order."""
        ...

    async def statuses(self, ids: Sequence[str]) -> dict[str, str]:
        """The status of each existing id, in one snapshot."""
        ...

    async def changes_since(self, token: object | None) -> tuple[object, Changes]:
        """Whether anything committed since ``token`` (what the previous call returned; None
        the first time, which always answers `Changes.OTHERS`), and the token for the next
        call. `Changes.OWN`: only this store's own writes, whose callers it answered (the
        manager signals those itself); `Changes.OTHERS`: another process or store may have
        committed, so a waiter should read again. Cheap when nothing changed; never misses
        a foreign commit (answering OTHERS when unsure is always allowed). SQLite compares
        ``PRAGMA data_version`` values; PostgreSQL can count LISTEN/NOTIFY messages."""
        ...

    async def events(self, task_id: str) -> list[TaskEvent]:
        """The task's transitions, in commit order."""
        ...

    async def health(self) -> dict[str, Any]:
        """A dict of ``schema_version``, ``integrity`` (``"ok"`` or what the check found),
        ``wal_bytes`` (a store without a WAL says 0), ``counts`` (tasks by status, only the
        statuses that have some), ``expired_leases`` and ``durability`` (what its writes
        run with: ``"normal"`` or ``"full"``)."""
        ...

    async def prune(self, before_ms: int) -> tuple[int, list[str]]:
        """Delete terminal tasks finished strictly before ``before_ms``, with their images'
        rows and events (never the ledger); returns (tasks deleted, the relative paths of
        their image files, references included)."""
        ...

    async def file_state(self, task_ids: Sequence[str]) -> tuple[dict[str, tuple[str, int]], set[str]]:
        """For the orphan sweep, about the given ids only: id -> (status, attempt counter, as
        stored: released attempts included) for those that exist, and every image path
        their rows point to."""
        ...

    # -- the web door: API tokens, and the event feed --

    async def add_token(self, token_id: str, owner: str, digest: str, label: str | None) -> int:
        """Store a token's id and digest (never the token itself); returns its creation time
        (ms). A taken id raises (ids are random: the caller makes a new one)."""
        ...

    def try_token(self, token_id: str) -> TokenRow | _WouldWait | None:
        """The token row (id, owner, digest, label, created_at ms, revoked_at ms or None)
        read on the caller's thread without waiting, `WOULD_WAIT`, or None when unknown.
        Asked once per web request, so it must cost a point read at most."""
        ...

    async def token(self, token_id: str) -> TokenRow | None:
        """`try_token`, as a read that may wait."""
        ...

    async def tokens(self, owner: str | None) -> list[TokenRow]:
        """Every token row (of ``owner``, if named), revoked ones included, oldest first."""
        ...

    async def revoke_tokens(self, token_id: str | None, owner: str | None) -> int:
        """Mark one token (by id) or every live token of ``owner`` revoked; how many were."""
        ...

    def try_events_after(self, after: int, owner: str | None, limit: int) -> list[TaskEvent] | _WouldWait:
        """Up to ``limit`` events with ``seq`` above ``after``, in commit order, of
        ``owner``'s tasks only when named, each with its ``seq`` and ``owner`` set; read on
        the caller's thread without waiting (`WOULD_WAIT`: use `events_after`). ``seq``
        only grows: an event committed later never has a lower one."""
        ...

    async def events_after(self, after: int, owner: str | None, limit: int) -> list[TaskEvent]:
        """`try_events_after`, as a read that may wait."""
        ...

    async def last_event(self) -> int:
        """The highest ``seq`` so far (0 when there is no event)."""
        ...
