"""Tasks and events as JSON objects: `Task`'s and `TaskEvent`'s field names, times as ISO 8601
UTC strings (what ``--json`` prints and the web door answers)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ._models import Task, TaskEvent

__all__ = ["event_json", "iso_time", "task_json"]


def iso_time(value: datetime | None) -> str | None:
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
        "created_at": iso_time(task.created_at),
        "started_at": iso_time(task.started_at),
        "finished_at": iso_time(task.finished_at),
    }


def event_json(event: TaskEvent) -> dict[str, Any]:
    """An event as a JSON object: `TaskEvent`'s field names."""
    return {
        "task_id": event.task_id,
        "at": iso_time(event.at),
        "kind": event.kind,
        "attempt": event.attempt,
        "status": event.status.value,
        "worker": event.worker,
        "detail": event.detail,
        "seq": event.seq,
    }
