"""The push channel: one feed of the database's task events per app, fanned out to the open
Server-Sent Events streams of each owner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from .. import ConfigError, Task, TaskEvent, TaskManager, TaskNotFound

__all__ = ["Hub"]

log = logging.getLogger("imagetask.web")

#: A comment line sent this often on an idle stream, so proxies keep it open.
KEEPALIVE_SECONDS = 15.0
#: Events queued for one slow stream before it is dropped (the client reconnects and resumes).
_QUEUE = 1000


class Hub:
    """Fans the manager's event feed out to the streams, by owner."""

    def __init__(self, manager: TaskManager, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self._manager = manager
        self._keepalive = keepalive
        self._streams: dict[str, set[asyncio.Queue[TaskEvent | None]]] = {}
        self._feed: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        #: The seq of the last event fanned out (every event up to it went to the queues).
        self._position = 0

    @property
    def streams(self) -> int:
        """How many streams are open."""
        return sum(len(queues) for queues in self._streams.values())

    async def close(self) -> None:
        if self._feed is not None:
            self._feed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feed
            self._feed = None
        for queues in self._streams.values():
            for queue in queues:
                queue.put_nowait(None)

    async def _run(self) -> None:
        try:
            async for event in self._manager.feed.watch(after=self._position):
                self._position = event.seq
                for queue in list(self._streams.get(event.owner, ())):
                    if queue.qsize() >= _QUEUE:
                        queue.put_nowait(None)  # too far behind: end it; the client resumes
                        self._streams[event.owner].discard(queue)
                    else:
                        queue.put_nowait(event)
        except ConfigError:  # the manager closed: nothing more will come
            pass
        except Exception:
            log.exception("the event feed of the web streams stopped; the streams end, and clients reconnect")
            raise
        finally:
            # The feed ended (an error, or the manager closed): end every stream now rather
            # than leave it open with nothing coming; clients reconnect and resume.
            for queues in self._streams.values():
                for queue in queues:
                    queue.put_nowait(None)
            self._streams.clear()

    async def _ensure_feed(self) -> None:
        async with self._starting:
            if self._feed is None or self._feed.done():
                self._position = await self._manager.feed.last_seq()
                self._feed = asyncio.create_task(self._run(), name="imagetask-web-feed")

    async def events(
        self,
        owner: str,
        last_id: int | None,
        render: Callable[[Task], dict[str, Any]],
        alive: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[str]:
        """The SSE messages of ``owner``'s task changes, after event ``last_id`` when given;
        ``render`` turns a task into its JSON (with URLs under the stream's own prefix);
        ``alive`` is asked once a keepalive interval, events or not: False (its token was
        revoked) ends the stream."""
        queue: asyncio.Queue[TaskEvent | None] = asyncio.Queue()
        await self._ensure_feed()
        # No await between reading the position and joining: every later event reaches the
        # queue, every earlier one (after ``last_id``) is read back from the database.
        caught_up = self._position
        self._streams.setdefault(owner, set()).add(queue)
        try:
            yield "retry: 3000\n\n"
            after = caught_up if last_id is None else last_id
            while after < caught_up:
                found = await self._manager.feed.read(after, owner=owner, limit=200)
                for old in found:
                    if old.seq > caught_up:
                        break
                    yield await self._message(old, render)
                if len(found) < 200:
                    break
                after = found[-1].seq
            loop = asyncio.get_running_loop()
            checked = loop.time()
            while True:
                try:
                    event: TaskEvent | None = await asyncio.wait_for(queue.get(), self._keepalive)
                    idle = False
                except TimeoutError:
                    event, idle = None, True
                # The token is looked at once a keepalive interval, idle or busy: a revoked
                # one ends a stream that events keep flowing to as well.
                if loop.time() - checked >= self._keepalive:
                    if not await alive():
                        return
                    checked = loop.time()
                if idle:
                    yield ": keepalive\n\n"
                    continue
                if event is None:
                    return
                if last_id is not None and event.seq <= last_id:
                    continue
                yield await self._message(event, render)
        finally:
            queues = self._streams.get(owner)
            if queues is not None:
                queues.discard(queue)
                if not queues:
                    del self._streams[owner]

    async def _message(self, event: TaskEvent, render: Callable[[Task], dict[str, Any]]) -> str:
        try:
            task: Any = render(await self._manager.poll(event.task_id))
        except TaskNotFound:  # pruned since
            task = None
        data = json.dumps({"seq": event.seq, "event": event.kind, "task_id": event.task_id, "task": task})
        return f"id: {event.seq}\nevent: task\ndata: {data}\n\n"
