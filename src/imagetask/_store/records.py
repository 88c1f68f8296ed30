"""The records the store and the worker pass each other (a submit's row, a claim, its answer)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import attrs

from .._models import StoredImage

__all__ = ["WOULD_WAIT", "Changes", "Claimed", "SubmitRow", "Submitted", "Versions"]


class SubmitRow(NamedTuple):
    """Everything a submit writes for one task (validated, priced, references copied); a
    named tuple: one is made per submitted request."""

    id: str
    owner: str
    prompt: str
    model: str
    params: dict[str, Any]
    max_attempts: int
    cost: int
    charge: bool
    idempotency_key: str | None
    #: Hash of the request, kept only with an idempotency key (to compare re-submits).
    fingerprint: str | None
    metadata_json: str
    #: The stored copies of the reference images.
    references: tuple[StoredImage, ...] = ()
    #: ``params`` as stored (sorted-key JSON), when the caller has it already.
    params_json: str | None = None
    #: The name of the provider that validated it: only workers of that provider run it.
    provider: str = ""
    #: Refuse the row (`TooManyPending`) when its owner already has this many unfinished
    #: tasks, counted in the submit's transaction; None: no limit.
    max_pending: int | None = None


@attrs.frozen
class Claimed:
    """A task a worker just claimed, with what it needs to run one attempt."""

    id: str
    owner: str
    prompt: str
    model: str
    params: dict[str, Any]
    attempt: int
    max_attempts: int
    references: tuple[StoredImage, ...]
    #: How many earlier attempts were handed back at a clean close (they do not count).
    released: int = 0
    #: How many earlier attempts ended in a retry, by error code (for per-code retry limits).
    retries: Mapping[str, int] = attrs.field(factory=dict)


class Submitted(NamedTuple):
    """The outcome of one submit: the task id, whether this call created it, and when (ms,
    inside the transaction). A named tuple: one is made per submitted row, on the hot path."""

    id: str
    created: bool
    at: int


class _WouldWait(enum.Enum):
    WOULD_WAIT = "would wait"


#: What `TaskStore.try_get` returns when it cannot answer without waiting (then await `get`).
WOULD_WAIT = _WouldWait.WOULD_WAIT


class Changes(enum.Enum):
    """What `TaskStore.changes_since` saw commit since the token it was given."""

    #: Nothing committed.
    NONE = "none"
    #: Only this store's own writes committed (their callers were answered, and signalled).
    OWN = "own"
    #: Another process (or another store on the same database) may have committed.
    OTHERS = "others"


@attrs.frozen
class Versions:
    """The SQLite store's `changes_since` token: the point-read connection's
    ``data_version``, and the write connections' at the last time others' commits were
    reported (the baseline moves only then, so a foreign commit is never skipped past)."""

    reader: int
    writers: tuple[int, ...]

    @staticmethod
    def compare(seen: Versions | None, reader: int, writers: tuple[int, ...]) -> tuple[Versions, Changes]:
        """The reader's version moved: whose commit was it? A write connection's version
        moves only for the *other* connections' commits, so if any of ours is unchanged
        since the baseline, only this store wrote."""
        if seen is not None and any(a == b for a, b in zip(writers, seen.writers, strict=True)):
            return Versions(reader, seen.writers), Changes.OWN
        return Versions(reader, writers), Changes.OTHERS
