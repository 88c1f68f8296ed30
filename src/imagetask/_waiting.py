"""Waiting for tasks: who waits for which task, the signals that wake them, and the watcher that
notices other processes' commits."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence

from ._exceptions import ImageTaskError, TaskNotFound, WaitTimeout
from ._models import Task, TaskEvent, TaskStatus
from ._store import WOULD_WAIT, Changes, TaskStore

__all__ = ["Waiting"]

log = logging.getLogger("imagetask")


class Waiting:
    """The waiters of one manager, by task id.

    A transition made in this process signals its waiters at once (`notify`). A commit from
    another process is noticed by the watcher, which runs while anyone waits and asks the
    store what changed (`TaskStore.changes_since`): nothing (cheap), only this process's own
    commits (their waiters were signalled, so nothing is re-read), or someone else's (the
    waited tasks' statuses are read, in one snapshot). The pause between checks doubles up
    to ``poll_interval``, and starts again from ``poll_interval / 10`` when a look finds a
    task that ended elsewhere (more may follow). Even when only this process writes, the
    watcher looks at least every ``10 * poll_interval`` while anything changes: a safety
    net, should a transition of this process ever fail to signal.
    """

    def __init__(
        self, store: TaskStore, poll: Callable[[str], Awaitable[Task]], poll_interval: float
    ) -> None:
        self._store = store
        self._poll = poll
        self._poll_interval = poll_interval
        #: Each waiter's future gets the task as it ended here, or None: then it reads it.
        self._waiters: dict[str, set[asyncio.Future[Task | None]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        #: Set by every local terminal transition, for the feeds (`feed`).
        self._changed = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiters)

    def notify(self, task_id: str, task: Task | None = None, *, kept: bool = False) -> None:
        """Wake whoever waits for ``task_id``: it reached a terminal state here, and ``task``
        is what that transition committed (None: the waiters read the task themselves).

        Each waiter gets a task of its own (its metadata, params and provenance are the
        caller's to change), as from a read: the first gets ``task`` itself unless the
        notifier ``kept`` it to answer its own caller, the others a deep copy.
        """
        self._changed.set()
        share = task is not None and not kept
        for fut in self._waiters.pop(task_id, ()):
            if not fut.done():
                fut.set_result(task if share or task is None else copy.deepcopy(task))
                share = False

    async def close(self) -> None:
        """Stop the watcher; every waiter raises `ImageTaskError`; feeds end."""
        self._closed = True
        self._changed.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        closed = ImageTaskError("the TaskManager was closed while waiting for this task")
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(closed)
        self._waiters.clear()

    def _listen(self, task_id: str, fut: asyncio.Future[Task | None]) -> None:
        self._waiters.setdefault(task_id, set()).add(fut)

    def _unlisten(self, task_id: str, fut: asyncio.Future[Task | None]) -> None:
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[task_id]

    async def wait(self, task_id: str, timeout: float | None) -> Task:
        """Until the task is terminal (see `TaskManager.wait`)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Task | None] = loop.create_future()
        self._listen(task_id, fut)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    task = await self._poll(task_id)  # after registering: no missed signal
                    if task.done:
                        return task
                    self._ensure_watcher()
                    ended = await fut
                    if ended is not None:  # ended here: the transition's own record, no read
                        return ended
                    fut = loop.create_future()
                    self._listen(task_id, fut)
        except TimeoutError:
            assert timeout is not None
            raise WaitTimeout(task_id, timeout) from None
        finally:
            self._unlisten(task_id, fut)

    async def as_completed(self, ids: Sequence[str], timeout: float | None) -> AsyncGenerator[Task, None]:
        """Each task as it ends (see `TaskManager.as_completed`)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Register first, then read: a task that ends between the two is not missed. One
        # batched status read for all ids; then each task as it ends here comes with its
        # record, and one that ended elsewhere is read.
        woken: asyncio.Queue[str] = asyncio.Queue()
        futures: dict[str, asyncio.Future[Task | None]] = {}

        def listen(task_id: str) -> None:
            fut: asyncio.Future[Task | None] = loop.create_future()
            fut.add_done_callback(lambda f: woken.put_nowait(task_id) if not f.cancelled() else None)
            futures[task_id] = fut
            self._listen(task_id, fut)

        def unlisten(task_id: str) -> None:
            fut = futures.pop(task_id)
            fut.cancel()
            self._unlisten(task_id, fut)

        try:
            for task_id in ids:
                listen(task_id)
            statuses = await self._store.statuses(ids)
            missing = [task_id for task_id in ids if task_id not in statuses]
            if missing:
                raise TaskNotFound(", ".join(missing))
            for task_id in ids:
                if TaskStatus(statuses[task_id]).terminal:
                    unlisten(task_id)
                    yield await self._poll(task_id)
            while futures:
                self._ensure_watcher()
                try:
                    async with asyncio.timeout_at(deadline):
                        task_id = await woken.get()
                except TimeoutError:
                    raise WaitTimeout(", ".join(futures), timeout or 0.0) from None
                fut = futures.pop(task_id, None)
                if fut is None:  # a wake-up for a task already yielded above: nothing to do
                    continue
                ended = fut.result()  # raises if the manager closed meanwhile
                task = ended if ended is not None else await self._poll(task_id)
                if not task.done:  # woken early (a change from another process): listen again
                    listen(task_id)
                    continue
                yield task
        finally:
            for task_id in list(futures):
                unlisten(task_id)

    async def feed(
        self, after: int | None, owner: str | None, batch: int = 200
    ) -> AsyncGenerator[TaskEvent, None]:
        """Every event after ``after`` (None: from now on), as it commits (see `TaskManager.watch`).

        A terminal transition made here wakes the feed at once; other commits (claims,
        other processes) are found by looking again after a pause that doubles from
        ``poll_interval / 10`` up to ``poll_interval`` and starts again after each find.
        """
        floor = self._poll_interval / 10
        pause = floor
        last = await self._store.last_event() if after is None else after
        while not self._closed:
            self._changed.clear()
            found = self._store.try_events_after(last, owner, batch)
            if found is WOULD_WAIT:
                found = await self._store.events_after(last, owner, batch)
            for event in found:
                last = event.seq
                yield event
            if len(found) == batch:
                continue
            if found:
                pause = floor
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._changed.wait()
            pause = min(pause * 2, self._poll_interval)

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="imagetask-watch")

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        floor = self._poll_interval / 10
        interval = floor
        last_look = -float("inf")
        # None: the first turn always looks, because a task may have ended elsewhere after a
        # waiter's own read and before this watcher started.
        token: object | None = None
        while self._waiters:
            await asyncio.sleep(interval)
            try:
                token, seen = await self._store.changes_since(token)
                # The pause doubles (up to poll_interval) unless a look finds a task ended
                # elsewhere: then others may follow soon, so the next check comes soon too.
                interval = min(interval * 2, self._poll_interval)
                if seen is Changes.NONE:
                    continue
                if seen is Changes.OWN and loop.time() - last_look < 10 * self._poll_interval:
                    continue  # only our own commits, whose waiters were signalled
                last_look = loop.time()
                ids = list(self._waiters)
                found = await self._store.statuses(ids)
                for task_id in ids:
                    status = found.get(task_id)
                    if status is None or TaskStatus(status).terminal:
                        self.notify(task_id)
                        interval = floor
            except Exception:  # the database refused, a hook raised: look again later
                log.exception("checking the database for changes failed")
                interval = self._poll_interval
