"""TaskManager: the async engine every door (sync facade, CLI, notebooks, web) stands on."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import enum
import logging
import os
import warnings
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _config, _prune
from ._checks import (
    _as_image_list,
    _check_arg_seconds,
    _check_id,
    _check_limit,
    _check_options,
    _check_owner,
    _iterable,
    _locations,
    _max_pending,
)
from ._exceptions import ConfigError, TaskNotFound, ValidationError
from ._feed import Feed
from ._images import ImageStore
from ._inside import awaited_by_attempt
from ._intake import Intake, called, failure_of, queued_task, the_one, to_the_end
from ._models import GenerationRequest, ImageInput, Task, TaskEvent, TaskStatus, now_ms
from ._records import Credits, Health, PruneReport
from ._store import WOULD_WAIT, Store, SubmitRow, Submitted, TaskStore
from ._tokens import Tokens
from ._waiting import Waiting
from ._worker import Worker
from .providers.base import Provider

if TYPE_CHECKING:
    from .testing import Faults

__all__ = ["TaskManager"]

log = logging.getLogger("imagetask")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class TaskManager:
    """Durable background image generation on one SQLite file.

    Use it as ``async with TaskManager(...) as tm:`` (or ``await tm.open()`` and
    ``await tm.aclose()``). ``submit`` answers at once with a queued `Task`; workers in
    this process (unless ``workers=False``) run it in the background; ``poll``,
    ``pending``, ``list``, ``wait`` and ``as_completed`` read only the database.

    Args:
        path: The SQLite file. Default: ``tasks.db`` in ``$IMAGETASK_HOME`` or the
            platform's user data folder.
        images: Folder for image files. Default: ``images/`` beside the database.
        provider: The image backend. Default: ``GeminiProvider()`` when
            ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY`` is set, else none.
        concurrency: Most tasks this process runs at once.
        per_owner: Most tasks one owner has running at once, across every process
            sharing the database.
        workers: False for a process that only submits and polls (a web front end
            whose work runs in ``imagetask worker``).
        max_attempts: Attempt budget fixed on each task at submit.
        attempt_timeout: Seconds one attempt may take before it counts as a timeout.
        lease: Seconds a claim lasts without a heartbeat; a dead worker's tasks are
            taken back this long after it stopped renewing.
        retry_delay: First backoff in seconds; it doubles (with jitter) each attempt.
        credits: True to charge each task's cost at submit and refund it on failure
            or cancellation.
        durability: ``"normal"`` survives process crashes; ``"full"`` also fsyncs
            every commit, to survive power loss.
        poll_interval: Longest pause between two checks of the database for changes
            made by other processes (while someone waits).
        storage_timeout: Seconds an attempt keeps trying to store its images while the
            image folder refuses them (read-only, full, I/O error) before the task fails
            with ``storage_error`` (and is refunded); the provider is never asked again.
        faults: For tests: faults to inject into the store (see `imagetask.testing`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        provider: Provider | None = None,
        concurrency: int = _config.DEFAULT_CONCURRENCY,
        per_owner: int = _config.DEFAULT_PER_OWNER,
        *,
        images: str | os.PathLike[str] | None = None,
        workers: bool = True,
        max_attempts: int = _config.DEFAULT_MAX_ATTEMPTS,
        attempt_timeout: float = _config.DEFAULT_ATTEMPT_TIMEOUT,
        lease: float = _config.DEFAULT_LEASE,
        retry_delay: float = _config.DEFAULT_RETRY_DELAY,
        credits: bool = False,
        durability: str = "normal",
        poll_interval: float = _config.DEFAULT_POLL_INTERVAL,
        storage_timeout: float = _config.DEFAULT_STORAGE_TIMEOUT,
        faults: Faults | None = None,
    ) -> None:
        _check_options(
            concurrency=concurrency, per_owner=per_owner, max_attempts=max_attempts,
            attempt_timeout=attempt_timeout, poll_interval=poll_interval, lease=lease,
            retry_delay=retry_delay, storage_timeout=storage_timeout, durability=durability,
        )  # fmt: skip
        self.path, self.images_root = _locations(path, images)
        self.provider: Provider | None = (
            provider if provider is not None else _config.default_provider(workers=bool(workers))
        )
        self.concurrency = concurrency
        self.per_owner = per_owner
        self.workers = workers
        self.max_attempts = max_attempts
        self.attempt_timeout = float(attempt_timeout)
        self.lease = float(lease)
        self.retry_delay = float(retry_delay)
        self.charging = bool(credits)
        self.durability = durability
        self.poll_interval = float(poll_interval)
        self.storage_timeout = float(storage_timeout)
        self.credits = Credits(self)
        self.tokens = Tokens(self)
        self.feed = Feed(self)
        # The manager and its workers see the store only through its contract.
        self._store: TaskStore = Store(self.path, self.images_root, durability, faults)
        self._images = ImageStore(self.images_root, sync_dirs=durability == "full", faults=faults)
        self._worker: Worker | None = None
        self._state = _State.NEW
        self._waiting = Waiting(self._store, self.poll, self.poll_interval)
        self._intake = Intake(lambda: self.provider, self._images, self.max_attempts, self.charging)
        self._closing: asyncio.Future[None] | None = None
        #: The event loop the manager was opened on (galleries refresh there).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._galleries: set[concurrent.futures.Future[None]] = set()

    def __repr__(self) -> str:
        provider = self.provider.name if self.provider is not None else None
        return (
            f"TaskManager(path={str(self.path)!r}, provider={provider!r}, "
            f"workers={self.workers}, state={self._state.value})"
        )

    # -- lifecycle --

    async def open(self) -> TaskManager:
        """Open the database (migrating it), take back expired leases, start workers.

        Raises:
            ConfigError: workers were asked for but there is no usable provider.
            StoreError: the database file cannot be used.
        """
        if self._state is not _State.NEW:
            raise ConfigError(f"this TaskManager is {self._state.value}; create a new one to open again")
        if self.workers and self.provider is None:
            raise ConfigError(
                "no image provider: set GEMINI_API_KEY (or GOOGLE_API_KEY) to use Gemini, pass "
                "provider=FakeProvider() to run offline, or pass workers=False for a process "
                "that only submits and polls"
            )
        self._loop = asyncio.get_running_loop()
        await self._store.open()
        try:
            if self.workers:
                assert self.provider is not None
                await self.provider.start()
                self._worker = Worker(
                    self._store, self._images, self.provider, concurrency=self.concurrency,
                    per_owner=self.per_owner, lease=self.lease, attempt_timeout=self.attempt_timeout,
                    retry_delay=self.retry_delay, poll_interval=self.poll_interval,
                    storage_timeout=self.storage_timeout, on_terminal=self._waiting.notify,
                )  # fmt: skip
                self._worker.start()
        except BaseException:
            await self._store.close()
            raise
        self._state = _State.OPEN
        log.info("opened %s (workers=%s)", self.path, self.workers)
        return self

    async def aclose(self, *, cancel_running: bool = True, grace: float | None = None) -> None:
        """Stop the workers and close the database. Queued tasks stay queued for the next start.

        Args:
            cancel_running: True (the default): attempts still generating are stopped and
                handed back at once, to run again at the next start (a handed-back attempt
                does not count against ``max_attempts``). False: wait for the attempts
                already generating to finish (and hand back only those not yet started).
                Attempts already storing their images finish first either way. While a
                close that waits is under way, ``aclose(cancel_running=True)`` hands the
                rest back at once (a second Ctrl-C), and both return when it is closed.
            grace: With ``cancel_running=False``: the longest wait, in seconds, before the
                attempts still generating are handed back (None: no limit).

        Raises:
            ConfigError: awaited with ``cancel_running=False`` and no ``grace`` from inside
                a generation this manager runs (a provider's code): it would wait for itself.
        """
        if grace is not None:
            _check_arg_seconds("grace", grace)
        if not cancel_running and grace is None and awaited_by_attempt(self._worker):
            raise ConfigError(
                "aclose(cancel_running=False) awaited inside a generation this manager runs would wait for "
                "itself forever; close from outside the provider, or pass grace="
            )
        if self._closing is not None:  # a close is under way
            if cancel_running and self._worker is not None:
                self._worker.hurry()
            await self._wait_closed()
            return
        if self._state is not _State.OPEN:
            self._state = _State.CLOSED
            return
        self._closing = asyncio.ensure_future(self._close(cancel_running, grace))
        await self._wait_closed()

    async def _close(self, cancel_running: bool, grace: float | None) -> None:
        self._state = _State.CLOSED
        try:
            for gallery in list(self._galleries):
                gallery.cancel()
            if self._worker is not None:
                await self._worker.stop(drain=not cancel_running, grace=grace)
            await self._waiting.close()
            if self.provider is not None and self.workers:
                await self.provider.aclose()  # a provider's own code: it may raise
        finally:  # whatever failed above, no connection (nor its thread) outlives the manager
            await self._store.close()
        log.info("closed %s", self.path)

    async def _wait_closed(self) -> None:
        try:
            await asyncio.shield(self._closing)  # type: ignore[arg-type]
        except asyncio.CancelledError:  # the close goes on: an error it raises is logged
            self._closing.add_done_callback(self._log_close_error)  # type: ignore[union-attr]
            raise

    def _log_close_error(self, closing: asyncio.Future[None]) -> None:
        if not closing.cancelled() and (exc := closing.exception()) is not None:
            log.error("closing %s failed: %s: %s", self.path, type(exc).__name__, exc)

    async def __aenter__(self) -> TaskManager:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> None:
        raise TypeError(
            "TaskManager is asynchronous: use `async with TaskManager(...) as tm:`, or "
            "`with SyncTaskManager(...) as tm:` in code without asyncio"
        )

    def __exit__(self, *exc: object) -> None:  # pragma: no cover - __enter__ always raises
        pass

    def __del__(self) -> None:
        if getattr(self, "_state", None) is _State.OPEN:
            warnings.warn(
                f"{self!r} was never closed; use `async with TaskManager(...)` or `await tm.aclose()`",
                ResourceWarning,
                stacklevel=1,
            )

    @property
    def is_open(self) -> bool:
        """True between `open` and `aclose`."""
        return self._state is _State.OPEN

    def _require_open(self) -> TaskStore:
        if self._state is _State.NEW:
            raise ConfigError("the TaskManager is not open; use `async with TaskManager(...) as tm:`")
        if self._state is _State.CLOSED:
            raise ConfigError("the TaskManager is closed; create a new one")
        return self._store

    # -- submit --

    async def submit(
        self,
        prompt: str,
        *,
        n: int = 1,
        model: str | None = None,
        aspect_ratio: str | None = None,
        size: str | None = None,
        images: ImageInput | Sequence[ImageInput] = (),
        owner: str = _config.DEFAULT_OWNER,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_pending: int | None = None,
    ) -> Task:
        """Record a generation request and return it queued, without calling the provider.

        When this returns, the task is durable: it survives a crash of this process.

        Args:
            prompt: What to draw (1 to 10,000 characters after stripping).
            n: How many images (1 to 8); each is one provider call.
            model: A model id from the provider's table; default: the provider's.
            aspect_ratio: e.g. ``"16:9"``; must be one the model supports.
            size: ``"1K"``, ``"2K"`` or ``"4K"`` where the model supports it.
            images: Reference images (paths, bytes or PIL images); copied into the store.
            owner: Who the task belongs to (limits and credits are per owner).
            idempotency_key: Re-submitting the same request with the same key returns
                the first task and charges nothing more.
            metadata: Your own JSON-able data, stored and returned untouched.
            max_pending: Refuse the task when its owner already has this many unfinished
                (queued or running) tasks; counted in the submit's transaction, so two
                processes cannot both pass it. None: no limit.

        Raises:
            ValidationError: naming the bad field; nothing is written.
            InsufficientCredits: credits are on and the owner cannot pay; nothing is written.
            TooManyPending: the owner is at ``max_pending``; nothing is written.
            ConfigError: the manager has no provider to validate against.
        """
        images = () if isinstance(images, tuple) and not images else _as_image_list(images)
        request = GenerationRequest(
            prompt=prompt, n=n, model=model, aspect_ratio=aspect_ratio, size=size, images=images,
            owner=owner, idempotency_key=idempotency_key, metadata=metadata
        )  # fmt: skip
        self._require_open()
        limit = _max_pending(max_pending)
        intake = self._intake  # without reference images: no await before the commit
        row = intake.make_row(request, ()) if not request.images else await intake.prepare(request)
        if limit is not None:
            row = row._replace(max_pending=limit)
        if not row.references:  # the common case, without `_enqueue`'s coroutine
            done = the_one(await self._store.submit([row], atomic=False))
            return self._queued(row, done) if done.created else await self._resubmitted(row, done)
        # Its reference files may be deleted only if the row was not written, so a cancelled
        # caller waits for the commit in flight before the cancellation goes on.
        write = asyncio.ensure_future(self._enqueue(row))
        cancelled = await to_the_end(write)
        failure = failure_of(write)
        if failure is not None:
            await self._intake.discard_unwritten([row], failure, self._store.statuses)
            raise asyncio.CancelledError() if cancelled else failure
        done = write.result()
        task = self._queued(row, done) if done.created else await self._resubmitted(row, done)
        if cancelled:
            raise asyncio.CancelledError()
        return task

    async def submit_many(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, max_pending: int | None = None
    ) -> builtins.list[Task]:
        """Submit many requests in one transaction: all are written, or none.

        Every request is validated before anything is written.

        Args:
            requests: ``GenerationRequest`` objects or dicts of ``submit``'s arguments.
            max_pending: As in `submit`, for each owner, counting the batch's own tasks.

        Returns:
            The tasks, in the order of ``requests``.

        Raises:
            ValidationError: naming the request and field (``requests[3].prompt: ...``).
            InsufficientCredits: an owner cannot pay for its share; nothing is written.
            TooManyPending: an owner would pass ``max_pending``; nothing is written.
        """
        store = self._require_open()
        limit = _max_pending(max_pending)
        items = [GenerationRequest._coerce(item, i) for i, item in enumerate(_iterable("requests", requests))]
        rows = await self._intake.prepare_many(items)
        if limit is not None:
            rows = [row._replace(max_pending=limit) for row in rows]
        write = asyncio.ensure_future(called(store.submit, rows, atomic=True))  # any error: in `write`
        cancelled = await to_the_end(write)
        failure = failure_of(write)
        if failure is not None:
            await self._intake.discard_unwritten(rows, failure, store.statuses)
            raise asyncio.CancelledError() if cancelled else failure
        tasks: builtins.list[Task] = []
        for row, result in zip(rows, write.result(), strict=True):
            assert isinstance(result, Submitted)
            # Each created row answers `queued` at the time inside the transaction.
            tasks.append(
                queued_task(row, result.at) if result.created else await self._resubmitted(row, result)
            )
        log.info("submitted %d task(s) in one transaction", len(tasks))
        if self._worker is not None:
            owners = {row.owner for row in rows}
            self._worker.wake(owners.pop() if len(owners) == 1 else None)
        if cancelled:  # written all the same: keep it, and let the cancellation go on
            raise asyncio.CancelledError()
        return tasks

    async def _enqueue(self, row: SubmitRow) -> Submitted:
        """Commit one submit, sharing a transaction with concurrent ones (group commit)."""
        return the_one(await self._store.submit([row], atomic=False))

    async def _resubmitted(self, row: SubmitRow, submitted: Submitted) -> Task:
        """The answer to a submit whose idempotency key found the first task: that task."""
        await self._intake.discard(row)
        log.info("task %s: re-submitted with idempotency key; returning the first", submitted.id)
        return await self.poll(submitted.id)

    def _queued(self, row: SubmitRow, submitted: Submitted) -> Task:
        """The answer to a submit that created its row; wakes this process's workers."""
        log.info("task %s: queued for %s (%s, n=%d)", row.id, row.owner, row.model, row.params["n"])
        task = queued_task(row, submitted.at)
        if self._worker is not None:
            self._worker.wake(row.owner)
        return task

    # -- reads: the database only, never the provider --

    async def poll(self, task_id: str) -> Task:
        """The task as the database holds it now (one read; never calls the provider).

        Raises:
            TaskNotFound: no task has this id.
        """
        store = self._require_open()
        task_id = _check_id(task_id)
        task = store.try_get(task_id)  # no await in the common case
        if task is WOULD_WAIT:
            task = await store.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def pending(self, owner: str | None = None) -> builtins.list[Task]:
        """Queued and running tasks (of one owner, or all), newest first."""
        if owner is not None:
            _check_owner(owner)
        return await self._require_open().pending(owner)

    async def list(
        self,
        owner: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """One page of tasks, newest first.

        Args:
            owner: Only this owner's tasks.
            status: Only tasks in this status.
            limit: Page size, 1 to 1,000.
            before: A task id: list tasks older than it (pass the last id of a page).
        """
        if owner is not None:
            _check_owner(owner)
        status_value = None
        if status is not None:
            try:
                status_value = TaskStatus(status).value
            except ValueError:
                raise ValidationError(
                    "status",
                    f"unknown status {status!r}; use one of {', '.join(s.value for s in TaskStatus)}",
                ) from None
        _check_limit(limit)
        if before is not None:
            before = _check_id(before, "before")
        return await self._require_open().list_tasks(owner, status_value, limit, before)

    async def events(self, task_id: str) -> tuple[TaskEvent, ...]:
        """The task's event log, oldest first: every transition with its attempt and worker.

        Raises:
            TaskNotFound: no task has this id.
        """
        task = await self.poll(task_id)
        return tuple(await self._store.events(task.id))

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Wait until the task is terminal and return it.

        In the process that runs the task this wakes on an in-process signal; otherwise
        it re-reads the database when SQLite reports a change (checked cheaply, with
        backoff up to ``poll_interval``). It never calls the provider.

        Raises:
            TaskNotFound: no task has this id.
            WaitTimeout: ``timeout`` seconds passed; the task keeps running.
        """
        if timeout is not None:
            _check_arg_seconds("timeout", timeout)
        task_id = _check_id(task_id)
        self._require_open()
        return await self._waiting.wait(task_id, timeout)

    async def as_completed(
        self, ids: Iterable[str], timeout: float | None = None
    ) -> AsyncGenerator[Task, None]:
        """Yield each task as it reaches a terminal state (already-finished ones first).

        Raises:
            TaskNotFound: an id is unknown (checked before anything is yielded).
            WaitTimeout: ``timeout`` seconds passed before all finished.
        """
        if timeout is not None:
            _check_arg_seconds("timeout", timeout)
        self._require_open()
        ids = list(dict.fromkeys(_check_id(task_id) for task_id in _iterable("ids", ids)))
        # aclosing: a caller that stops early unregisters its waiters now, not at collection.
        async with contextlib.aclosing(self._waiting.as_completed(ids, timeout)) as tasks:
            async for task in tasks:
                yield task

    @property
    def waiting(self) -> int:
        """How many tasks `wait` or `as_completed` callers of this manager are waiting for."""
        return len(self._waiting)

    @property
    def worker_id(self) -> str | None:
        """The id this manager's workers record on the tasks they run (`TaskEvent.worker`):
        ``host/boot/pid/start/token``; None without workers or before `open`."""
        return None if self._worker is None else self._worker.id

    async def health(self) -> Health:
        """Check the database: schema version, integrity (a full ``quick_check``, which reads
        every page: seconds on a big file), WAL size, tasks by status, expired leases."""
        return Health._of(self.path, self.images_root, await self._require_open().health())

    def gallery(self, owner: str | None = None, limit: int = 24) -> None:
        """Show the latest tasks as a live grid in a Jupyter notebook: images as inline
        thumbnails, pending tasks as animated skeleton cards that turn into their images
        when they land (updated in place, while the kernel stays free for other cells),
        failures with their reason. After a kernel restart, open the same database and call
        it again: in-flight tasks show up and finish there.

        Args:
            owner: Only this owner's tasks.
            limit: How many of the newest tasks (1 to 1,000).

        Raises:
            ConfigError: outside IPython, or IPython is not installed
                (``pip install 'imagetask[notebook]'``).
        """
        if owner is not None:
            _check_owner(owner)
        _check_limit(limit)
        self._require_open()
        from ._display import start_gallery

        assert self._loop is not None
        start_gallery(lambda: self.list(owner=owner, limit=limit), None, self._loop, self._galleries)

    # -- cancel, prune --

    async def cancel(self, task_id: str) -> Task:
        """Cancel a queued or running task; a finished task is returned unchanged.

        A queued task is cancelled at once. A running one is marked cancelled at once
        (refunding its charge) and its attempt stops: now if it runs in this process,
        at its next heartbeat if it runs in another. Every waiter returns.

        Raises:
            TaskNotFound: no task has this id.
        """
        store = self._require_open()
        task_id = _check_id(task_id)
        cancelled = await store.cancel(task_id, "cancelled by the caller")
        if cancelled is None:  # it had ended (or there is no such task: poll says so)
            return await self.poll(task_id)
        log.info("task %s: cancelled", task_id)
        if self._worker is not None:
            self._worker.stop_local(task_id, "cancelled")
        self._waiting.notify(task_id, cancelled, kept=True)
        return cancelled

    async def prune(self, older_than: float) -> PruneReport:
        """Delete tasks that finished more than ``older_than`` seconds ago, with their
        images and events, and sweep orphan image files and the web app's cached thumbnails
        of images no longer kept (in its default folder). The credit ledger is never touched.
        """
        _check_arg_seconds("older_than", older_than)
        store = self._require_open()
        return await _prune.prune(store, self._images, self.images_root, now_ms() - int(older_than * 1000))


TaskManager.__module__ = "imagetask"
