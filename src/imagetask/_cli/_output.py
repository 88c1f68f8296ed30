"""How the command prints: tasks and events as JSON (Task's field names) or as short lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from .. import Task
from .._jsonout import event_json, task_json
from .._jsonout import iso_time as _time

__all__ = ["TASK_HEADER", "describe", "dump_json", "event_json", "task_json", "task_line"]


def dump_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


#: The header of `task_line`'s columns.
TASK_HEADER = f"{'ID':<26}  {'STATUS':<9}  {'MODEL':<26}  PROMPT"


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
    yield f"cost:        {task.cost} credit(s) (its price; charged only when credits are on)"
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
