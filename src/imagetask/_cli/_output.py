"""How the command prints: tasks and events as JSON (Task's field names) or as short lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from .. import Task, TaskEvent

__all__ = ["describe", "dump_json", "event_json", "task_json", "task_line"]


def _time(value: datetime | None) -> str | None:
    """An ISO 8601 UTC time with milliseconds and a ``Z``, as JSON readers expect."""
    if value is None:
        return None
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_json(task: Task) -> dict[str, Any]:
    """A task as a JSON object: `Task`'s field names, times as ISO 8601 UTC strings."""

    def image(im: Any) -> dict[str, Any]:
        return {
            "path": str(im.path),
            "mime": im.mime,
            "width": im.width,
            "height": im.height,
            "sha256": im.sha256,
            "size": im.size,
        }

    error = task.error
    return {
        "id": task.id,
        "owner": task.owner,
        "prompt": task.prompt,
        "model": task.model,
        "params": dict(task.params),
        "status": task.status.value,
        "images": [image(im) for im in task.images],
        "references": [image(im) for im in task.references],
        "error": None
        if error is None
        else {"code": error.code, "message": error.message, "retryable": error.retryable},
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "cost": task.cost,
        "metadata": dict(task.metadata),
        "idempotency_key": task.idempotency_key,
        "created_at": _time(task.created_at),
        "started_at": _time(task.started_at),
        "finished_at": _time(task.finished_at),
    }


def event_json(event: TaskEvent) -> dict[str, Any]:
    """An event as a JSON object: `TaskEvent`'s field names."""
    return {
        "task_id": event.task_id,
        "at": _time(event.at),
        "kind": event.kind,
        "attempt": event.attempt,
        "status": event.status.value,
        "worker": event.worker,
        "detail": event.detail,
    }


def dump_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def task_line(task: Task) -> str:
    """One line per task: id, status, model, age, prompt (and the error of a failure)."""
    line = f"{task.id}  {task.status.value:<9}  {task.model:<26}  {task.prompt[:48]}"
    if task.error is not None:
        line += f"  [{task.error.code}: {task.error.message}]"
    return line


def describe(task: Task) -> Iterable[str]:
    """`imagetask show`: every field of a task, one per line."""
    yield f"id:          {task.id}"
    yield f"status:      {task.status.value}"
    yield f"owner:       {task.owner}"
    yield f"model:       {task.model}  {_params(task.params)}"
    yield f"prompt:      {task.prompt}"
    yield f"attempts:    {task.attempts} of {task.max_attempts}"
    yield f"cost:        {task.cost} credit(s)"
    for name in ("created_at", "started_at", "finished_at"):
        value = getattr(task, name)
        yield f"{name + ':':<12} {_time(value) or '-'}"
    if task.idempotency_key is not None:
        yield f"key:         {task.idempotency_key}"
    if task.metadata:
        yield f"metadata:    {json.dumps(dict(task.metadata), ensure_ascii=False)}"
    if task.error is not None:
        yield f"error:       {task.error.code}: {task.error.message}"
    for im in task.references:
        yield f"reference:   {im.path}  ({im.width}x{im.height} {im.mime})"
    for im in task.images:
        yield f"image:       {im.path}  ({im.width}x{im.height} {im.mime}, {im.size} bytes)"


def _params(params: Any) -> str:
    shown: Sequence[str] = [f"{k}={v}" for k, v in sorted(dict(params).items()) if v is not None]
    return " ".join(shown)
