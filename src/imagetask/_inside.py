"""Which attempt runs the current code: the mark a waiting close checks, so that a provider
awaiting it from inside a generation gets an error instead of waiting for itself."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

__all__ = ["awaited_by_attempt", "mark_attempt"]

#: The worker, and the task of its attempt (or of one of the attempt's calls to the
#: provider), that runs the current code.
_mark: contextvars.ContextVar[tuple[object, asyncio.Task[Any] | None] | None] = contextvars.ContextVar(
    "imagetask_attempt", default=None
)


def mark_attempt(worker: object) -> None:
    """Mark the current task as one that ``worker``'s attempt awaits (its own task, or a
    call it waits for); a task started from it inherits the mark but is not marked."""
    _mark.set((worker, asyncio.current_task()))


def awaited_by_attempt(worker: object) -> bool:
    """Whether the current task is one that an attempt of ``worker`` awaits: a close that
    waits for the attempts would then wait for itself. A task the provider starts (which
    the attempt does not await by itself), or that outlives its attempt, is not."""
    mark = _mark.get()
    return mark is not None and worker is not None and mark[0] is worker and mark[1] is asyncio.current_task()
