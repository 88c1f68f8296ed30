"""Checks of the manager's options and its methods' arguments: each refusal names the field
(a `ConfigError` for an option, a `ValidationError` for an argument)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import _config
from ._exceptions import ConfigError, ValidationError
from ._models import ImageInput, check_text


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> tuple[ImageInput, ...]:
    """``images=`` takes one image or a sequence of them."""
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike) or hasattr(images, "getpixel"):
        return (images,)  # type: ignore[return-value]
    try:
        return tuple(images)
    except TypeError:
        raise ValidationError(
            "images", f"expected a path, bytes, a PIL image or a list of them, got {type(images).__name__}"
        ) from None


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _seconds_problem(value: object, positive: bool, minimum: float = 0.0) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "a finite number of seconds"
    if isinstance(value, int) and abs(value) > _config.MAX_SECONDS:  # before float(): 2**2000
        return "a number of seconds up to 1e9 (about 31 years)"
    if not math.isfinite(value):
        return "a finite number of seconds"
    if value < 0 or (positive and value == 0):
        return "a number of seconds > 0" if positive else "a number of seconds >= 0"
    if value < minimum:
        return f"a number of seconds >= {minimum:g}"
    if value > _config.MAX_SECONDS:
        return "a number of seconds up to 1e9 (about 31 years)"
    return None


def _check_seconds(name: str, value: object, *, positive: bool, minimum: float = 0.0) -> None:
    """Check a manager option given in seconds."""
    problem = _seconds_problem(value, positive, minimum)
    if problem:
        raise ConfigError(f"{name}: must be {problem}, got {value!r}")


def _check_options(
    *, concurrency: object, per_owner: object, max_attempts: object, attempt_timeout: object,
    poll_interval: object, lease: object, retry_delay: object, storage_timeout: object,
    durability: object,
) -> None:  # fmt: skip
    """The `TaskManager` options, checked before anything is opened or written."""
    _check_int("concurrency", concurrency, 1)
    _check_int("per_owner", per_owner, 1)
    _check_int("max_attempts", max_attempts, 1)
    _check_seconds("attempt_timeout", attempt_timeout, positive=True)
    _check_seconds("poll_interval", poll_interval, positive=True)
    # Leases are stored in milliseconds and renewed every lease / 3: below 0.1 s a lease
    # would run out before its renewal could commit.
    _check_seconds("lease", lease, positive=True, minimum=0.1)
    _check_seconds("retry_delay", retry_delay, positive=False)
    _check_seconds("storage_timeout", storage_timeout, positive=False)
    if durability not in ("normal", "full"):
        raise ConfigError(f"durability: must be 'normal' or 'full', got {durability!r}")


def _locations(
    path: str | os.PathLike[str] | None, images: str | os.PathLike[str] | None
) -> tuple[Path, Path]:
    """The manager's database file and image folder, absolute (the defaults filled in)."""
    if isinstance(path, str | os.PathLike) and os.fspath(path) in ("", ":memory:"):
        raise ConfigError(
            "path: must be a file; an in-memory database cannot be shared by the "
            "connections and processes imagetask uses (pass a path, e.g. tmp_path / 'tasks.db')"
        )
    _check_path("path", path)
    _check_path("images", images)
    db = Path(path) if path is not None else _config.default_home() / _config.DB_NAME
    db = db.expanduser().absolute()
    root = (Path(images) if images is not None else db.parent / _config.IMAGES_DIR).expanduser().absolute()
    if not root.name:  # "/": no folder beside it for thumbnails, and the system's own folders in it
        raise ConfigError(
            f"images: {root} is the root of the file system; give the images a folder of their own "
            "(e.g. /srv/imagetask/images)"
        )
    return db, root


def _check_path(name: str, value: object) -> None:
    """A path option the file system can take: no NUL, nothing the OS cannot encode."""
    if value is None:
        return
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(f"{name}: must be a path (str or os.PathLike), got {type(value).__name__}")
    text = os.fspath(value)
    problem = None
    if (b"\0" if isinstance(text, bytes) else "\0") in text:
        problem = "contains a NUL character"
    else:
        try:
            os.fsencode(text)
        except UnicodeEncodeError as exc:
            problem = f"cannot be encoded for the file system ({exc.reason})"
    if problem:
        raise ConfigError(f"{name}: {text!r} {problem}; pass another path")


def _check_arg_seconds(name: str, value: object) -> None:
    """Check a method argument given in seconds."""
    problem = _seconds_problem(value, positive=False)
    if problem:
        raise ValidationError(name, f"must be {problem}, got {value!r}")


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValidationError("limit", f"must be an integer from 1 to 1000, got {limit!r}")


def _iterable(field: str, value: Any) -> Iterable[Any]:
    """A list-like argument: a str (an id, a prompt) is a mistake, not a sequence of letters."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(field, f"must be a list, got {type(value).__name__}")
    return value


def _check_owner(owner: object) -> None:
    """The same rules as ``submit``'s owner, for every method that takes one."""
    check_text("owner", owner, _config.MAX_KEY_CHARS, strip=False)


def _check_id(task_id: object, field: str = "task_id") -> str:
    if not isinstance(task_id, str):
        raise ValidationError(field, f"must be a string, got {type(task_id).__name__}")
    if not task_id.isascii() or "\x00" in task_id:  # no task id can be: and SQLite could not take it
        raise ValidationError(field, f"{task_id!r} is not a task id (26 ASCII letters and digits)")
    if len(task_id) == 26 and not task_id.isupper() and task_id.isalnum():
        # Ids are Crockford base 32, which reads letters in either case: one typed or copied
        # in lower case names the same task.
        return task_id.upper()
    return task_id


def _max_pending(value: object) -> int | None:
    """``max_pending`` checked: None, or an integer of at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("max_pending", f"must be an integer >= 1, or None for no limit; got {value!r}")
    return value
