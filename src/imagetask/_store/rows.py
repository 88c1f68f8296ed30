"""Rows and records, both ways: the one place that turns the store's rows into `Task` and
`StoredImage` records (by column name; the point read's joined rows by the column order it
selects), and the one place a submitted `SubmitRow` maps to the columns it inserts."""

from __future__ import annotations

import functools
import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from .._models import _STATUSES, StoredImage, Task, TaskError, TaskList, _json_object
from .records import Claimed, SubmitRow

__all__ = ["TASK_COLUMNS", "Rows", "provenance_json", "task_from_row"]

#: The one place a task column maps to a `Task` field: each field, and the expression over
#: the columns (by name) that gives its value. The store selects exactly the columns named
#: here (`TASK_COLUMNS`); adding a column means a migration and a line here.
_TASK_FIELDS: dict[str, str] = {
    "id": "id",
    "owner": "owner",
    "prompt": "prompt",
    "model": "model",
    "params": "json_object(params)",
    "status": "STATUSES[status]",
    "images": "tuple(images)",
    "references": "tuple(references)",
    "error": (
        "None if error_code is None else TaskError(error_code, error_message or '', bool(error_retryable))"
    ),
    "attempts": "attempt - released",  # attempts handed back by a clean close do not count
    "max_attempts": "max_attempts",
    "cost": "cost",
    "metadata": "json_object(metadata)",
    "idempotency_key": "idempotency_key",
    "created_at": "fromtimestamp(created_at / 1000, UTC)",
    "started_at": "None if started_at is None else fromtimestamp(started_at / 1000, UTC)",
    "finished_at": "None if finished_at is None else fromtimestamp(finished_at / 1000, UTC)",
}
TASK_COLUMNS = (
    "id", "owner", "prompt", "model", "params", "status", "attempt", "max_attempts", "cost",
    "idempotency_key", "metadata", "error_code", "error_message", "error_retryable",
    "created_at", "started_at", "finished_at", "released", "refs",
)  # fmt: skip


def _row_decoder() -> Callable[..., Task]:
    """``from_row(row, images=(), references=())``: a task from a row of
    `TASK_COLUMNS` (any extra trailing values ignored), generated from `_TASK_FIELDS`
    so the hot path of every poll reads each column once, by position, without a lookup."""
    if set(_TASK_FIELDS) != {f.name for f in attrs.fields(Task)}:
        raise AssertionError("_TASK_FIELDS must name every field of Task")
    namespace: dict[str, Any] = {
        "new": object.__new__, "Task": Task, "json_object": _json_object, "STATUSES": _STATUSES,
        "TaskError": TaskError, "fromtimestamp": datetime.fromtimestamp, "UTC": UTC,
    }  # fmt: skip
    for name in _TASK_FIELDS:
        namespace[f"set_{name}"] = Task.__dict__[name].__set__
    unpack = ", ".join(TASK_COLUMNS)
    # Each field set straight into its slot, as `_build_task` does, without a call between.
    sets = "".join(f"    set_{name}(task, {expr})\n" for name, expr in _TASK_FIELDS.items())
    source = (
        "def from_row(row, images=(), references=()):\n"
        f"    ({unpack},) = row[:{len(TASK_COLUMNS)}]\n"
        f"    task = new(Task)\n{sets}    return task\n"
    )
    exec(source, namespace)
    decoder: Callable[..., Task] = namespace["from_row"]
    return decoder


task_from_row = _row_decoder()

_N_TASK_COLUMNS = len(TASK_COLUMNS)
_STATUS = TASK_COLUMNS.index("status")


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
        # Only a succeeded task has output images. A read without a snapshot (`pending`) can
        # see a success committed between its two statements: its outputs are not this row's.
        return TaskList(
            task_from_row(
                row, outputs.get(row[0], ()) if row[_STATUS] == "succeeded" else (), refs.get(row[0], ())
            )
            for row in rows
        )

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
        return task_from_row(first, outputs, refs)

    def ended(
        self, found: tuple[sqlite3.Row, list[sqlite3.Row]] | None, images: Sequence[StoredImage] = ()
    ) -> Task | None:
        """The task a terminal transition committed (its row, its reference rows), with the
        output ``images`` it wrote (the transaction had them in hand: not read back)."""
        if found is None:
            return None
        row, refs = found
        return task_from_row(row, tuple(images), tuple(self.image(r) for r in refs))

    def claimed(self, row: sqlite3.Row, refs: list[sqlite3.Row], retries: dict[str, int]) -> Claimed:
        """A claimed task, as the worker needs it: its request and its reference images."""
        return Claimed(
            id=row["id"],
            owner=row["owner"],
            prompt=row["prompt"],
            model=row["model"],
            params=json.loads(row["params"]),
            attempt=row["attempt"],
            max_attempts=row["max_attempts"],
            released=row["released"],
            references=tuple(self.image(r) for r in refs),
            retries=retries,
        )

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


# -- records to rows --


def provenance_json(provenance: Mapping[str, Any]) -> str:
    """An image's provenance as stored: a JSON object, keys sorted, values JSON cannot hold
    written as text (keys of mixed types are made text first, so they can be sorted)."""
    try:
        return json.dumps(dict(provenance), sort_keys=True, default=str)
    except TypeError:
        return json.dumps({str(k): v for k, v in provenance.items()}, sort_keys=True, default=str)


def _params_json(params: Mapping[str, Any]) -> str:
    """The stored JSON of a task's params (few distinct values: cached when hashable; the
    key holds each value's type, since ``True == 1`` but they are written differently)."""
    try:
        return _params_json_of(tuple((k, type(v), v) for k, v in sorted(params.items())))
    except TypeError:  # an unhashable value
        return json.dumps(params, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _params_json_of(items: tuple[tuple[str, type, Any], ...]) -> str:
    return json.dumps({k: v for k, _, v in items}, sort_keys=True)


#: The one place a submitted row maps to the columns of ``tasks``: each column, and the
#: expression over the `SubmitRow` (``row``) and the transaction's time (``now``) that fills it.
_SUBMIT_COLUMNS: dict[str, str] = {
    "id": "row.id",
    "owner": "row.owner",
    "prompt": "row.prompt",
    "model": "row.model",
    "params": "row.params_json or params_json(row.params)",
    "status": "'queued'",
    "attempt": "0",
    "max_attempts": "row.max_attempts",
    "cost": "row.cost",
    "refs": "len(row.references)",
    "idempotency_key": "row.idempotency_key",
    "fingerprint": "row.fingerprint",
    "metadata": "row.metadata_json",
    "run_after": "now",
    "created_at": "now",
    "updated_at": "now",
    "provider": "row.provider",
}
#: Columns whose value is a constant are written as SQL literals, not bound per row.
_SUBMIT_CONSTANTS = {c: e for c, e in _SUBMIT_COLUMNS.items() if e in ("'queued'", "0")}
_SUBMIT_BOUND = [c for c in _SUBMIT_COLUMNS if c not in _SUBMIT_CONSTANTS]
_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_SUBMIT_COLUMNS)}) VALUES "
    f"({', '.join(_SUBMIT_CONSTANTS.get(c, '?') for c in _SUBMIT_COLUMNS)})"
)


def _values_function(columns: list[str], *args: str) -> Callable[..., tuple[Any, ...]]:
    """A function of ``args`` (``row``, and ``now`` if it is needed) returning the values of
    ``columns`` as `_SUBMIT_COLUMNS` computes them: one tuple per row, the bulk insert's hot
    loop."""
    namespace: dict[str, Any] = {"params_json": _params_json}
    values = ", ".join(_SUBMIT_COLUMNS[c] for c in columns)
    exec(f"def values({', '.join(args)}):\n    return ({values},)\n", namespace)
    function: Callable[..., tuple[Any, ...]] = namespace["values"]
    return function


#: ``_task_values(row, now)``: the values `_INSERT_TASK` binds.
_task_values = _values_function(_SUBMIT_BOUND, "row", "now")

#: Columns filled with the transaction's time: bound once per statement in a bulk insert.
_SUBMIT_NOW = [c for c in _SUBMIT_BOUND if _SUBMIT_COLUMNS[c] == "now"]
_BULK_BOUND = [c for c in _SUBMIT_BOUND if c not in _SUBMIT_NOW]
#: ``_bulk_values(row)``: one row's values in a `_bulk_insert_sql` statement (all but the time).
_bulk_values = _values_function(_BULK_BOUND, "row")
#: The columns that differ from task to task in a batch of the same request shape. Every
#: other bound column (model, params, cost, metadata...) then repeats: a statement whose rows
#: all agree on them binds those once (``?2``...), which makes a row about a fifth cheaper.
_PER_ROW = ["id", "owner", "prompt"]
_SHARED = [c for c in _BULK_BOUND if c not in _PER_ROW]
#: ``_shared_values(row)``: the `_SHARED` values, bound once; ``_own_values(row)``: the rest.
_shared_values = _values_function(_SHARED, "row")
_own_values = _values_function(_PER_ROW, "row")
#: Where the fields that fill `_SHARED` start in a `SubmitRow`: rows with equal tails and their
#: params JSON given (not derived from ``params``, whose values may compare equal but be
#: written differently, like ``[1]`` and ``[True]``) agree on every shared column
#: (`test_the_bulk_insert_writes_what_the_one_row_insert_writes` holds this in step with the
#: fields).
_SHARED_FROM = SubmitRow._fields.index("model")
#: The most rows one bulk statement inserts. Statements insert a power of two of rows (64, 32,
#: ... 1: a batch of 100 is 64 + 32 + 4), so there are at most seven statement texts of each
#: kind and they stay in sqlite3's statement cache (preparing one of a size not seen before costs
#: more than running it: a few ms for the biggest).
BULK_ROWS = 64


@functools.lru_cache(maxsize=16)
def _bulk_insert_sql(count: int, shared: bool) -> str:
    """One ``INSERT`` of ``count`` rows (a multi-row ``VALUES``): about a third cheaper than
    ``executemany`` of the same rows. ``?1`` is the time; with ``shared``, the `_SHARED`
    values come next, once, then each row's `_PER_ROW` values; else each row's own values."""
    once = {c: f"?{i}" for i, c in enumerate(_SHARED, start=2)} if shared else {}
    numbers = itertools.count(2 + len(once))

    def placeholder(column: str) -> str:
        if column in _SUBMIT_CONSTANTS:
            return _SUBMIT_CONSTANTS[column]
        if column in _SUBMIT_NOW:
            return "?1"
        return once.get(column) or f"?{next(numbers)}"

    rows = ("(" + ", ".join(placeholder(c) for c in _SUBMIT_COLUMNS) + ")" for _ in range(count))
    return f"INSERT INTO tasks ({', '.join(_SUBMIT_COLUMNS)}) VALUES {', '.join(rows)}"


def insert_tasks(conn: sqlite3.Connection, rows: Sequence[SubmitRow], now: int) -> None:
    """Insert ``rows`` (new tasks) at ``now`` with the statements of `bulk_statements`."""
    bindable = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) - 1  # ?1 is the time
    for sql, values in bulk_statements(rows, now, bindable):
        conn.execute(sql, values)


def bulk_statements(rows: Sequence[SubmitRow], now: int, bindable: int) -> Iterator[tuple[str, list[Any]]]:
    """The statements that insert ``rows`` at ``now``, each with its values: up to `BULK_ROWS`
    rows a statement, a power of two each, fewer when the SQLite build binds fewer than
    ``bindable`` values a statement. A statement whose rows agree on every `_SHARED` value
    (with their params JSON given) binds those once."""
    size = BULK_ROWS
    while size > 1 and size * len(_BULK_BOUND) > bindable:
        size //= 2
    tail = _SHARED_FROM
    start = 0
    while start < len(rows):
        while size > len(rows) - start:
            size //= 2
        chunk = rows[start : start + size]
        first = chunk[0][tail:]
        if size > 1 and chunk[0].params_json is not None and all(row[tail:] == first for row in chunk):
            own = itertools.chain.from_iterable(map(_own_values, chunk))
            yield _bulk_insert_sql(size, True), [now, *_shared_values(chunk[0]), *own]
        else:
            every = itertools.chain.from_iterable(map(_bulk_values, chunk))
            yield _bulk_insert_sql(size, False), [now, *every]
        start += size
