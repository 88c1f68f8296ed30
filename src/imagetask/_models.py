"""The records imagetask hands out: tasks, images, statuses, errors, requests."""

from __future__ import annotations

import enum
import functools
import hashlib
import html
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import attrs

from . import _config
from ._exceptions import ValidationError

if TYPE_CHECKING:
    from PIL import Image

    from .providers.base import ModelInfo

__all__ = [
    "GenerationRequest",
    "ImageInput",
    "StoredImage",
    "Task",
    "TaskError",
    "TaskEvent",
    "TaskStatus",
]

#: What ``submit(images=...)`` accepts for one reference image.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image"


class TaskStatus(enum.StrEnum):
    """Where a task is in its life. The values are the strings stored in the database."""

    #: Accepted and durable, waiting for a worker (or for its retry time).
    QUEUED = "queued"
    #: Claimed by a worker that holds a lease on it.
    RUNNING = "running"
    #: Every requested image is stored. Terminal.
    SUCCEEDED = "succeeded"
    #: Ended without images; ``Task.error`` says why. Terminal.
    FAILED = "failed"
    #: Cancelled by a caller. Terminal.
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for the states a task never leaves."""
        return self in _TERMINAL


_TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@attrs.frozen
class TaskError:
    """Why a task failed or was cancelled.

    Attributes:
        code: A stable code: ``safety_blocked``, ``no_image``, ``bad_image``,
            ``rate_limited``, ``timeout``, ``server_error``, ``connection_error``,
            ``invalid_request``, ``auth_failed``, ``model_not_found``,
            ``storage_error`` (the images could not be stored: read-only folder, full
            disk, I/O error), ``interrupted``, ``cancelled``, ``internal_error``.
        message: The provider's own reason, or ours, in words.
        retryable: Whether the failure was of a kind that retries (it failed anyway
            because the attempts ran out).
    """

    code: str
    message: str
    retryable: bool = False


@attrs.frozen
class StoredImage:
    """One image file in the local store, validated with Pillow and hashed.

    Attributes:
        path: Absolute path of the file.
        mime: MIME type read from the bytes by Pillow (not what the provider claimed).
        width: Width in pixels.
        height: Height in pixels.
        sha256: Hex SHA-256 of the file's bytes.
        size: Size of the file in bytes.
        index: Position among the task's images (or reference images).
        provenance: What the provider said about this image (finish reason, model
            version, response id, token usage, text), when it said anything.
        url: Where the web app serves it, for a task read through `RemoteTaskManager`
            (``path`` is then its downloaded copy); None for a local task.
    """

    path: Path
    mime: str
    width: int
    height: int
    sha256: str
    size: int
    index: int = 0
    provenance: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    url: str | None = attrs.field(default=None, eq=False, repr=False)

    def open(self) -> Image.Image:
        """Open the image with Pillow."""
        from PIL import Image

        return Image.open(self.path)

    def read_bytes(self) -> bytes:
        """The file's bytes."""
        return self.path.read_bytes()

    def _repr_html_(self) -> str:
        # Jupyter shows a downscaled inline preview, never the whole file nor a file:// link.
        from ._display import thumbnail_uri

        uri = thumbnail_uri(self)
        if uri is None:
            return f"<em>image file missing: {html.escape(str(self.path))}</em>"
        return (
            f'<img src="{uri}" title="{html.escape(str(self.path))}" '
            f'alt="{self.width}x{self.height} {html.escape(self.mime)}">'
        )


@attrs.frozen
class Task:
    """An immutable snapshot of one task, as the database held it when read.

    Attributes:
        id: Time-sortable id (newer tasks sort after older ones).
        owner: Who the task belongs to (limits and credits are per owner).
        prompt: The text prompt.
        model: The model id.
        params: Generation parameters: ``n``, ``aspect_ratio``, ``size``.
        status: A `TaskStatus`.
        images: The stored result images, in order (empty unless succeeded).
        references: The reference images given to ``submit``, as stored copies.
        error: Why the task failed or was cancelled, else None.
        attempts: How many times a worker claimed the task: claims lost to a crash or a
            stall count, attempts handed back by a clean close do not.
        max_attempts: The attempt budget fixed at submit.
        cost: Price of the task in credits (charged only when credits are on).
        metadata: The caller's own JSON-able data, returned untouched.
        idempotency_key: The key given to ``submit``, if any.
        created_at: When ``submit`` committed it (UTC).
        started_at: When a worker first claimed it.
        finished_at: When it reached a terminal state.
    """

    id: str
    owner: str
    prompt: str
    model: str
    params: Mapping[str, Any]
    status: TaskStatus
    images: tuple[StoredImage, ...] = ()
    references: tuple[StoredImage, ...] = ()
    error: TaskError | None = None
    attempts: int = 0
    max_attempts: int = _config.DEFAULT_MAX_ATTEMPTS
    cost: int = 0
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    idempotency_key: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the task is in a terminal state."""
        return self.status.terminal

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.status is TaskStatus.SUCCEEDED

    def _repr_html_(self) -> str:
        # A card: its images as inline thumbnails, a skeleton while pending, or its error.
        from ._display import grid

        return grid([self])


_STATUSES = {s.value: s for s in TaskStatus}


class TaskList(list["Task"]):
    """A list of tasks (what ``list`` and ``pending`` return) that shows itself as a grid of
    cards in a notebook."""

    def _repr_html_(self) -> str:
        from ._display import grid

        return grid(self)


@attrs.frozen
class TaskEvent:
    """One transition of a task, as its event log recorded it (``await tm.events(id)``).

    Attributes:
        task_id: The task.
        at: When the transition committed (UTC).
        kind: ``claimed``, ``retry``, ``lease_expired``, ``released``, ``succeeded``,
            ``failed`` or ``cancelled``.
        attempt: The attempt number it belongs to (the fencing token: it only grows).
        status: The task's status right after it.
        worker: The worker that made it (``host/boot/pid/start/token``), or None (a cancel).
        detail: Why, where there is more to say: the error code and message of a retry or a
            failure, ``holder_gone`` for a lease taken back from a dead process, the reason
            of a cancel.
        seq: Its place in the database's event log: it grows with every event of every task,
            so "the events after ``seq``" resumes a feed (`TaskManager.watch`).
        owner: The task's owner.
    """

    task_id: str
    at: datetime
    kind: str
    attempt: int
    status: TaskStatus
    worker: str | None = None
    detail: str | None = None
    seq: int = 0
    owner: str = ""

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> TaskEvent:
        """Build an event from a ``task_events`` row, by column name."""
        return cls(
            task_id=row["task_id"],
            at=datetime.fromtimestamp(row["at"] / 1000, tz=UTC),
            kind=row["event"],
            attempt=row["attempt"],
            status=_STATUSES[row["status"]],
            worker=row["worker"],
            detail=row["detail"],
            seq=row["id"],
        )

    def _repr_html_(self) -> str:
        detail = f" &middot; {html.escape(self.detail)}" if self.detail else ""
        return (
            f"<code>{self.at:%Y-%m-%d %H:%M:%S.%f}</code> <b>{html.escape(self.kind)}</b> "
            f"attempt {self.attempt} &rarr; {html.escape(self.status.value)}{detail}"
        )


def _task_builder(constants: Mapping[str, str] | None = None) -> Callable[..., Task]:
    """A function taking every field of `Task` by keyword (but those given in ``constants``:
    field name -> expression) that builds it by setting its slots directly. attrs' generated
    ``__init__`` of a frozen class costs several µs a call, and this is the hot path of
    every poll and submit; nothing is validated there either way.
    `test_the_fast_task_builder_matches_init` keeps the two in step."""
    constants = constants or {}
    names = [f.name for f in attrs.fields(Task)]
    namespace: dict[str, Any] = {"new": object.__new__, "Task": Task, "QUEUED": TaskStatus.QUEUED}
    for name in names:
        namespace[f"set_{name}"] = Task.__dict__[name].__set__
    given = ", ".join(name for name in names if name not in constants)
    body = "".join(f"    set_{name}(task, {constants.get(name, name)})\n" for name in names)
    source = f"def build(*, {given}):\n    task = new(Task)\n{body}    return task\n"
    exec(source, namespace)  # the same technique attrs uses to generate __init__
    build: Callable[..., Task] = namespace["build"]
    return build


_build_task = _task_builder()
#: The snapshot a submit answers with: the fields a new task has not filled yet are constants.
_build_queued = _task_builder(
    {"status": "QUEUED", "images": "()", "error": "None", "attempts": "0", "started_at": "None",
     "finished_at": "None"}
)  # fmt: skip


for _cls in (Task, TaskError, TaskEvent, StoredImage, TaskStatus):
    _cls.__module__ = "imagetask"


@functools.lru_cache(maxsize=512)
def _parse_flat_json(text: str) -> dict[str, Any] | None:
    value: dict[str, Any] = json.loads(text)
    return None if any(isinstance(v, dict | list) for v in value.values()) else value


def _json_object(text: str) -> dict[str, Any]:
    """Decode a stored JSON object, the caller's own to change. Small flat ones repeat
    (params of the same shape), so their parse is cached; a nested one is parsed each time,
    since a shallow copy would share its inner dicts and lists with every later read."""
    if text == "{}":
        return {}
    flat = _parse_flat_json(text) if len(text) <= 256 else None
    value: dict[str, Any] = dict(flat) if flat is not None else json.loads(text)
    return value


def _from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def now_ms() -> int:
    """Wall-clock time in integer milliseconds, as stored in the database."""
    return time.time_ns() // 1_000_000


# --- requests ---------------------------------------------------------------------------------


@attrs.frozen
class GenerationRequest:
    """One request to generate images, as ``submit`` takes it.

    ``submit(prompt, **kw)`` and ``submit_many([GenerationRequest(...), {...}])`` accept
    the same fields.
    """

    prompt: str
    n: int = 1
    model: str | None = None
    aspect_ratio: str | None = None
    size: str | None = None
    images: Sequence[ImageInput] = ()
    owner: str = _config.DEFAULT_OWNER
    idempotency_key: str | None = None
    metadata: Mapping[str, Any] | None = None

    @classmethod
    def _coerce(cls, item: GenerationRequest | Mapping[str, Any], position: int) -> GenerationRequest:
        if isinstance(item, GenerationRequest):
            return item
        if not isinstance(item, Mapping):
            raise ValidationError(
                f"requests[{position}]",
                f"expected a dict of submit() arguments or a GenerationRequest, got {type(item).__name__}",
            )
        names = set(attrs.fields_dict(cls))
        unknown = sorted(set(item) - names)
        if unknown:
            raise ValidationError(
                f"requests[{position}].{unknown[0]}",
                f"unknown argument; submit() takes {', '.join(sorted(names))}",
            )
        if "prompt" not in item:
            raise ValidationError(f"requests[{position}].prompt", "missing; every request needs a prompt")
        return cls(**item)


class CheckedRequest(NamedTuple):
    """A request that passed validation, normalised, with its price and fingerprint (a named
    tuple: one is made per submitted request)."""

    prompt: str
    model: str
    params: dict[str, Any]
    owner: str
    idempotency_key: str | None
    metadata_json: str
    references: tuple[bytes, ...]
    cost: int
    #: ``params`` as stored: sorted-key JSON.
    params_json: str

    def fingerprint(self) -> str:
        """A hash of everything that defines the work, to match idempotent re-submits."""
        p = self.params
        h = hashlib.sha256(f"{self.model}\x00{p['n']}\x00{p['aspect_ratio']}\x00{p['size']}\x00".encode())
        h.update(self.prompt.encode())
        for ref in self.references:
            h.update(hashlib.sha256(ref).digest())
        return h.hexdigest()


def check_text(field: str, value: object, limit: int, *, strip: bool) -> str:
    """A non-empty string of at most ``limit`` characters that SQLite can store (no NUL, no
    lone surrogate); stripped of surrounding whitespace with ``strip``.

    Raises:
        ValidationError: naming ``field``.
    """
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    text = value.strip() if strip else value
    if not text.strip():
        raise ValidationError(field, "must not be empty or only whitespace")
    if len(text) > limit:
        raise ValidationError(field, f"is {len(text)} characters; the limit is {limit}")
    if "\x00" in text:
        raise ValidationError(field, "must not contain NUL characters")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                field,
                f"holds a lone surrogate {text[exc.start]!r} at position {exc.start}, which is not "
                "text and cannot be stored; pass proper Unicode text (decode bytes with "
                "errors='replace')",
            ) from None
    return text


def _check_metadata(metadata: object) -> str:
    """The caller's metadata as JSON, or a ValidationError: a JSON object with string keys,
    nested at most `MAX_METADATA_DEPTH` deep, at most `MAX_METADATA_BYTES` encoded."""
    if not isinstance(metadata, Mapping):
        raise ValidationError("metadata", f"must be a dict, got {type(metadata).__name__}")
    _check_metadata_shape(metadata)
    try:
        text = json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
        # ASCII JSON escapes a lone surrogate ("\ud800") that no UTF-8 reader can take back:
        # such metadata would be stored, then break every answer that carries it.
        json.dumps(dict(metadata), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValidationError("metadata", "contains a lone surrogate, which is not valid Unicode") from None
    except (TypeError, ValueError) as exc:
        raise ValidationError("metadata", f"must be JSON-serialisable: {exc}") from None
    if len(text.encode()) > _config.MAX_METADATA_BYTES:
        raise ValidationError("metadata", f"is larger than {_config.MAX_METADATA_BYTES} bytes as JSON")
    return text


def _check_metadata_shape(metadata: Mapping[Any, Any]) -> None:
    """Walk the metadata without recursion: keys are strings, depth is bounded."""
    limit = _config.MAX_METADATA_DEPTH
    stack: list[tuple[object, str, int]] = [(metadata, "metadata", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, Mapping):
            children = []
            for key, child in value.items():
                if not isinstance(key, str):
                    raise ValidationError(
                        "metadata",
                        f"keys must be strings (JSON object keys); {where} has the key {key!r} "
                        f"({type(key).__name__}): use str({key!r})",
                    )
                children.append((child, f"{where}[{key!r}]"))
        elif isinstance(value, list | tuple):
            children = [(child, f"{where}[{i}]") for i, child in enumerate(value)]
        else:
            continue
        if depth > limit:  # a list or object this deep; plain values do not count as a level
            raise ValidationError("metadata", f"is nested deeper than {limit} levels (at {where})")
        stack.extend((child, path, depth + 1) for child, path in children)


def check_request(
    req: GenerationRequest,
    models: Mapping[str, ModelInfo],
    default_model: str,
    references: tuple[bytes, ...],
    shapes: dict[Any, Any] | None = None,
) -> CheckedRequest:
    """Validate one request against a provider's model table.

    Reference images must already have been read and checked by the image store
    (``references``); this checks their count against the model. ``shapes`` caches checks
    across calls against the same model table: requests of one shape (model, n, aspect
    ratio, size, reference count) are checked once, and so is each owner.

    Raises:
        ValidationError: naming the first bad field.
    """
    prompt = check_text("prompt", req.prompt, _config.MAX_PROMPT_CHARS, strip=True)
    owner = req.owner
    # A batch, or a run of submits, has few owners: each is checked once.
    if type(owner) is not str or shapes is None or ("owner", owner) not in shapes:
        owner = check_text("owner", owner, _config.MAX_KEY_CHARS, strip=False)
        if shapes is not None:
            shapes[("owner", owner)] = owner
    key = req.idempotency_key
    if key is not None:
        key = check_text("idempotency_key", key, _config.MAX_KEY_CHARS, strip=False)
    n = req.n
    # The type is part of the key: True == 1, but n=True is refused.
    shape = (req.model, type(n), n, req.aspect_ratio, req.size, len(references))
    try:
        known = shapes.get(shape) if shapes is not None else None
    except TypeError:  # an unhashable value: checked (and refused) below
        known, shapes = None, None
    if known is None:
        known = _check_shape(req, models, default_model, len(references))
        if shapes is not None:
            shapes[shape] = known
    model_id, cost, params_json = known
    metadata_json = "{}" if req.metadata is None else _check_metadata(req.metadata)
    params: dict[str, Any] = {"n": n, "aspect_ratio": req.aspect_ratio, "size": req.size}
    return CheckedRequest(
        prompt=prompt,
        model=model_id,
        params=params,
        owner=owner,
        idempotency_key=key,
        metadata_json=metadata_json,
        references=references,
        cost=cost,
        params_json=params_json,
    )


def _check_shape(
    req: GenerationRequest, models: Mapping[str, ModelInfo], default_model: str, references: int
) -> tuple[str, int, str]:
    """Check the model, n, aspect ratio, size and reference count; the model id, the cost and
    the params as stored."""
    model_id = default_model if req.model is None else req.model
    if not isinstance(model_id, str) or model_id not in models:
        known = ", ".join(sorted(models)) or "(none)"
        raise ValidationError("model", f"unknown model {model_id!r}; this provider serves: {known}")
    info = models[model_id]
    n = req.n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _config.MAX_N:
        raise ValidationError("n", f"must be an integer from 1 to {_config.MAX_N}, got {n!r}")
    if req.aspect_ratio is not None and req.aspect_ratio not in info.aspect_ratios:
        raise ValidationError(
            "aspect_ratio",
            f"{req.aspect_ratio!r} is not supported by {model_id}; use one of "
            + ", ".join(info.aspect_ratios),
        )
    if req.size is not None and req.size not in info.sizes:
        supported = ", ".join(info.sizes) if info.sizes else "none (leave size unset)"
        raise ValidationError("size", f"{req.size!r} is not supported by {model_id}; supported: {supported}")
    if references > info.max_reference_images:
        raise ValidationError(
            "images",
            f"{references} reference images given; {model_id} accepts at most {info.max_reference_images}",
        )
    params = {"n": n, "aspect_ratio": req.aspect_ratio, "size": req.size}
    return model_id, info.price_for(req.size) * n, json.dumps(params, sort_keys=True)
