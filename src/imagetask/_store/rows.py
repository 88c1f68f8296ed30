"""Row decoding: the one place that turns the store's rows into `Task` and `StoredImage`
records (by column name; the point read's joined rows by the column order it selects)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from .._models import StoredImage, Task, TaskList
from .reads import _N_TASK_COLUMNS

__all__ = ["Rows"]


class Rows:
    """Decodes rows of one store, whose image paths are relative to ``images_root``."""

    def __init__(self, images_root: Path) -> None:
        self.images_root = images_root
        self._prefix = os.path.join(str(images_root), "")

    def relative(self, image: StoredImage) -> str:
        """The path as stored: relative to the image root, with ``/``."""
        path = str(image.path)
        prefix = self._prefix
        if path.startswith(prefix):  # always, for files this store wrote: skip pathlib's parsing
            return path[len(prefix) :].replace(os.sep, "/")
        return image.path.relative_to(self.images_root).as_posix()

    def tasks(self, result: tuple[list[Any], list[sqlite3.Row]]) -> list[Task]:
        rows, image_rows = result
        outputs: dict[str, list[StoredImage]] = {}
        refs: dict[str, list[StoredImage]] = {}
        for r in image_rows:
            (outputs if r["role"] == "output" else refs).setdefault(r["task_id"], []).append(self.image(r))
        return TaskList(Task._from_row(row, outputs.get(row[0], ()), refs.get(row[0], ())) for row in rows)

    def task_from_join(self, rows: list[tuple[Any, ...]]) -> Task:
        """Build a Task from `_GET_ONE` rows: the task's columns, then one image per row."""
        first = rows[0]
        outputs: list[StoredImage] = []
        refs: list[StoredImage] = []
        if first[_N_TASK_COLUMNS] is not None:
            root = self.images_root
            for r in rows:
                (role, idx, path, mime, width, height, sha256, size, provenance) = r[_N_TASK_COLUMNS:]
                image = StoredImage(
                    root / path, mime, width, height, sha256, size, idx,
                    json.loads(provenance) if provenance != "{}" else {},
                )  # fmt: skip
                (outputs if role == "output" else refs).append(image)
        return Task._from_row(first, outputs, refs)

    def image(self, r: sqlite3.Row) -> StoredImage:
        return StoredImage(
            path=self.images_root / r["path"],
            mime=r["mime"],
            width=r["width"],
            height=r["height"],
            sha256=r["sha256"],
            size=r["size"],
            index=r["idx"],
            provenance=json.loads(r["provenance"]),
        )
