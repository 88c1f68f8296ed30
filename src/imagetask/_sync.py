"""SyncTaskManager: the blocking door, one `TaskManager` on an event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import os
import threading
import warnings
from collections.abc import Awaitable, Coroutine, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import _config
from ._exceptions import ConfigError
from ._manager import TaskManager
from ._models import GenerationRequest, ImageInput, Task, TaskEvent, TaskStatus
from ._records import Health, PruneReport

if TYPE_CHECKING:
    from .providers.base import Provider
    from .testing import Faults

__all__ = ["SyncCredits", "SyncRemoteTaskManager", "SyncTaskManager"]

T = TypeVar("T")


class SyncCredits:
    """Per-owner credit balances of a `SyncTaskManager` (``tm.credits``), blocking."""

    def __init__(self, manager: SyncTaskManager) -> None:
        self._manager = manager

    def grant(self, owner: str, amount: int) -> int:
        """Same as `Credits.grant`, but blocking."""
        return self._manager._call(self._manager._async.credits.grant(owner, amount))

    def balance(self, owner: str) -> int:
        """Same as `Credits.balance`, but blocking."""
        return self._manager._call(self._manager._async.credits.balance(owner))


class SyncTaskManager:
    """Same as `TaskManager`, but blocking: for scripts, threads and code without asyncio.

    It runs one `TaskManager` on its own event loop in a daemon thread, so generations go on
    between calls, and opens it when constructed (``with`` is optional; call `close` when
    done). Calls may come from any thread, and from inside another running event loop (a
    Jupyter cell, a web handler): only the manager's own loop thread may not call it (a
    callback running there must use the async `TaskManager` methods instead).

    Takes the same arguments as `TaskManager`.
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
        self._closed = True  # until opened: __del__ and close() must not act on a failed start
        manager = TaskManager(
            path, provider, concurrency, per_owner, images=images, workers=workers,
            max_attempts=max_attempts, attempt_timeout=attempt_timeout, lease=lease,
            retry_delay=retry_delay, credits=credits, durability=durability,
            poll_interval=poll_interval, storage_timeout=storage_timeout, faults=faults,
        )  # fmt: skip
        self._start(manager)

    def _start(self, manager: TaskManager) -> None:
        """Run ``manager`` on a new event loop in a daemon thread, and open it there."""
        self._async = manager
        self.credits = SyncCredits(self)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_run_loop, args=(self._loop,), name=f"imagetask-sync-{id(self):x}", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._call(manager.open())
        except BaseException:
            self._stop_loop()
            self._closed = True
            raise

    @property
    def path(self) -> Path:
        """The database file (see `TaskManager.path`)."""
        return self._async.path

    @property
    def images_root(self) -> Path:
        """The image folder (see `TaskManager.images_root`)."""
        return self._async.images_root

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"SyncTaskManager(path={str(self._async.path)!r}, workers={self._async.workers}, state={state})"
        )

    # -- running coroutines on the manager's loop --

    def _call(self, awaitable: Awaitable[T]) -> T:
        """Run ``awaitable`` on the manager's loop and block until it is done."""
        coroutine = _as_coroutine(awaitable)
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError(
                "SyncTaskManager was called from its own event loop's thread (from a callback "
                "or a task running there), where blocking would wait forever; use the async "
                "TaskManager methods there (await ...)"
            )
        if self._closed:
            coroutine.close()
            raise ConfigError("the SyncTaskManager is closed; create a new one")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:  # cancelled by close() from another thread
                raise ConfigError("the SyncTaskManager was closed while this call was running") from None
            raise
        except BaseException:
            # Interrupted (Ctrl-C) or failed: make sure the coroutine does not go on alone.
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    # -- lifecycle --

    def close(self, *, cancel_running: bool = False) -> None:
        """Stop the workers and close the database (safe to call twice).

        Args:
            cancel_running: False (the default): wait for the attempts already generating
                to finish; tasks still queued stay queued for the next start. True: hand
                running attempts back at once, so the next start runs them again.
        """
        if self._closed:
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "SyncTaskManager.close() was called from its own event loop's thread; "
                "close it from another thread"
            )
        try:
            self._call(self._async.aclose(cancel_running=cancel_running))
        finally:
            self._closed = True
            self._stop_loop()

    def __enter__(self) -> SyncTaskManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # An exception (Ctrl-C included) hands running attempts back at once.
        self.close(cancel_running=exc_type is not None)

    def __del__(self) -> None:
        if getattr(self, "_closed", True) is not False:
            return
        warnings.warn(
            f"{self!r} was never closed; use `with SyncTaskManager(...) as tm:` or call `tm.close()`",
            ResourceWarning,
            stacklevel=1,
        )
        # Close it in the background (handing running attempts back), then end the loop.
        self._closed = True
        loop = self._loop
        try:
            closing = asyncio.run_coroutine_threadsafe(self._async.aclose(), loop)
            closing.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
        except RuntimeError:  # the loop is already closed (interpreter shutdown)
            pass

    # -- the methods of TaskManager, blocking --

    def submit(
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
        """Same as `TaskManager.submit`, but blocking."""
        return self._call(
            self._async.submit(
                prompt, n=n, model=model, aspect_ratio=aspect_ratio, size=size, images=images,
                owner=owner, idempotency_key=idempotency_key, metadata=metadata, max_pending=max_pending,
            )
        )  # fmt: skip

    def submit_many(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, max_pending: int | None = None
    ) -> builtins.list[Task]:
        """Same as `TaskManager.submit_many`, but blocking."""
        return self._call(self._async.submit_many(builtins.list(requests), max_pending=max_pending))

    def poll(self, task_id: str) -> Task:
        """Same as `TaskManager.poll`, but blocking."""
        return self._call(self._async.poll(task_id))

    def pending(self, owner: str | None = None) -> builtins.list[Task]:
        """Same as `TaskManager.pending`, but blocking."""
        return self._call(self._async.pending(owner))

    def list(
        self,
        owner: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """Same as `TaskManager.list`, but blocking."""
        return self._call(self._async.list(owner, status, limit, before))

    def events(self, task_id: str) -> tuple[TaskEvent, ...]:
        """Same as `TaskManager.events`, but blocking."""
        return self._call(self._async.events(task_id))

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Same as `TaskManager.wait`, but blocking."""
        return self._call(self._async.wait(task_id, timeout))

    def as_completed(self, ids: Iterable[str], timeout: float | None = None) -> Iterator[Task]:
        """Same as `TaskManager.as_completed`, but a plain (blocking) iterator."""
        tasks = self._async.as_completed(builtins.list(ids), timeout)
        try:
            while True:
                try:
                    yield self._call(tasks.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed and threading.current_thread() is not self._thread:
                self._call(tasks.aclose())

    def cancel(self, task_id: str) -> Task:
        """Same as `TaskManager.cancel`, but blocking."""
        return self._call(self._async.cancel(task_id))

    def health(self) -> Health:
        """Same as `TaskManager.health`, but blocking."""
        return self._call(self._async.health())

    def gallery(self, owner: str | None = None, limit: int = 24) -> None:
        """Same as `TaskManager.gallery` (it refreshes on this manager's own loop)."""
        first = self.list(owner=owner, limit=limit)  # validates, and shows the grid at once
        from ._display import start_gallery

        start_gallery(
            lambda: self._async.list(owner=owner, limit=limit), first, self._loop, self._async._galleries
        )

    def prune(self, older_than: float) -> PruneReport:
        """Same as `TaskManager.prune`, but blocking."""
        return self._call(self._async.prune(older_than))


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The manager's thread: run its loop until stopped, then cancel what still runs there
    (a call from another thread, a submit copying its reference images) and let it finish
    its cleanup, as `asyncio.run` does, then close the loop."""
    try:
        loop.run_forever()
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _as_coroutine(awaitable: Awaitable[T]) -> Coroutine[Any, Any, T]:
    """``run_coroutine_threadsafe`` takes coroutines only (an async generator's ``__anext__``
    is merely awaitable)."""
    if isinstance(awaitable, Coroutine):
        return awaitable
    return _await(awaitable)


SyncTaskManager.__module__ = "imagetask"
SyncCredits.__module__ = "imagetask"


class SyncRemoteTaskManager(SyncTaskManager):
    """Same as `RemoteTaskManager`, but blocking (its methods are `SyncTaskManager`'s).

    Takes the same arguments as `RemoteTaskManager`. What only a local database can do
    (``health``, ``prune``, ``gallery``, granting credits) raises `ConfigError`.
    """

    def __init__(self, base_url: str, **options: Any) -> None:
        from ._remote import RemoteTaskManager

        self._closed = True
        # A RemoteTaskManager has the methods this class calls, with the same signatures.
        self._start(cast("TaskManager", RemoteTaskManager(base_url, **options)))

    @property
    def path(self) -> Path:
        """A remote manager has no database file here."""
        raise ConfigError(f"{self._async!r} has no local database file")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"SyncRemoteTaskManager({self._async!r}, state={state})"

    def health(self) -> Health:
        """Not available over HTTP."""
        raise ConfigError("health() reads the database itself: run `imagetask doctor` where it is")

    def prune(self, older_than: float) -> PruneReport:
        """Not available over HTTP."""
        raise ConfigError("prune() runs where the database is: `imagetask prune --older-than 30d`")

    def gallery(self, owner: str | None = None, limit: int = 24) -> None:
        """Not available over HTTP yet."""
        raise ConfigError("the notebook gallery needs a local TaskManager")

    def close(self, *, cancel_running: bool = False) -> None:
        """Close the HTTP connections (the server's tasks go on; safe to call twice)."""
        if self._closed:
            return
        try:
            self._call(self._async.aclose())
        finally:
            self._closed = True
            self._stop_loop()


SyncRemoteTaskManager.__module__ = "imagetask"
