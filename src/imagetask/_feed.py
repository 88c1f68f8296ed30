"""The event feed (``tm.feed``): every task transition in commit order, resumable by ``seq``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from ._checks import _check_limit, _check_owner
from ._exceptions import ValidationError
from ._models import TaskEvent
from ._store import WOULD_WAIT

if TYPE_CHECKING:
    from ._manager import TaskManager

__all__ = ["Feed"]


def _check_seq(after: object) -> None:
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValidationError("after", f"must be an event seq (an integer >= 0), got {after!r}")


class Feed:
    """Every task event of the database, in commit order (``tm.feed``): what a push channel
    (the web door's stream, your own webhook sender) stands on. Each `TaskEvent` carries its
    ``seq``, which only grows: keep the last one seen to resume after a disconnect or a
    restart. It reads only the database.
    """

    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager

    async def watch(
        self, *, after: int | None = None, owner: str | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        """Yield every event as it commits, until the manager closes.

        Events of this process's own terminal transitions arrive at once; others (claims,
        other processes) within ``poll_interval``.

        Args:
            after: Start after this ``seq``; None: with the next event to commit.
            owner: Only the events of this owner's tasks.
        """
        if after is not None:
            _check_seq(after)
        if owner is not None:
            _check_owner(owner)
        self._manager._require_open()
        async with contextlib.aclosing(self._manager._waiting.feed(after, owner)) as events:
            async for event in events:
                yield event

    async def read(self, after: int, *, owner: str | None = None, limit: int = 200) -> tuple[TaskEvent, ...]:
        """Up to ``limit`` (1 to 1,000) events with ``seq`` above ``after``, in commit order
        (of ``owner``'s tasks only, if named): one read of what `watch` would yield."""
        _check_seq(after)
        _check_limit(limit)
        if owner is not None:
            _check_owner(owner)
        store = self._manager._require_open()
        found = store.try_events_after(after, owner, limit)
        if found is WOULD_WAIT or (limit > len(found) == 200):  # the inline read stops at 200
            found = await store.events_after(after, owner, limit)
        return tuple(found)

    async def last_seq(self) -> int:
        """The highest event ``seq`` so far (0 when no task has had a transition)."""
        return await self._manager._require_open().last_event()


Feed.__module__ = "imagetask"
