"""The exceptions imagetask raises.

Every exception derives from one base class, so ``except ImageTaskError`` catches
them all; each also mixes in the builtin a caller would naturally catch::

    ImageTaskError
    ├── ValidationError (ValueError)      bad input to submit(); nothing was written
    ├── ConfigError                       the manager or a provider is misconfigured
    ├── TaskNotFound (LookupError)        no task has that id
    ├── InsufficientCredits               the owner cannot pay for the task; nothing was written
    ├── TooManyPending                    the owner has max_pending unfinished tasks; nothing was written
    ├── WaitTimeout (TimeoutError)        wait() gave up; the task keeps running
    ├── ProviderError                     one generation call failed (code, retryable)
    └── StoreError                        the database is unusable (corrupt, too new, locked)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ImageTaskError",
    "InsufficientCredits",
    "ProviderError",
    "StoreError",
    "TaskNotFound",
    "TooManyPending",
    "ValidationError",
    "WaitTimeout",
]


class ImageTaskError(Exception):
    """Base class of every error imagetask raises."""


class ValidationError(ImageTaskError, ValueError):
    """A request was rejected before anything was written.

    Attributes:
        field: The name of the offending argument (``"prompt"``, ``"n"``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ConfigError(ImageTaskError):
    """The manager or a provider cannot run as configured (no API key, bad option)."""


class TaskNotFound(ImageTaskError, LookupError):
    """No task with this id exists in the database."""

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"no task with id {task_id!r} in this database "
            "(it may have been pruned, or belong to another database file)"
        )
        self.task_id = task_id


class InsufficientCredits(ImageTaskError):
    """The owner's balance is lower than the task's cost; nothing was charged or written."""

    def __init__(self, owner: str, cost: int, balance: int) -> None:
        super().__init__(
            f"owner {owner!r} has {balance} credit(s) but the task costs {cost}; "
            f"grant more with `await tm.credits.grant({owner!r}, amount)`"
        )
        self.owner = owner
        self.cost = cost
        self.balance = balance


class TooManyPending(ImageTaskError):
    """The owner already has ``limit`` unfinished (queued or running) tasks; nothing was
    written. Checked inside the submit's transaction, so two processes cannot both pass it.

    Attributes:
        owner: Whose tasks.
        pending: How many of them were unfinished.
        limit: The ``max_pending`` the submit was given.
    """

    def __init__(self, owner: str, pending: int, limit: int) -> None:
        super().__init__(
            f"owner {owner!r} has {pending} unfinished task(s), the limit (max_pending) is {limit}; "
            "submit again once some have finished"
        )
        self.owner = owner
        self.pending = pending
        self.limit = limit


class WaitTimeout(ImageTaskError, TimeoutError):
    """``wait()`` ran out of time; the task itself keeps running."""

    def __init__(self, task_id: str, timeout: float) -> None:
        super().__init__(
            f"task {task_id} did not finish within {timeout:g} s; it is still queued or running "
            "(a worker must run it): wait again or poll it later"
        )
        self.task_id = task_id
        self.timeout = timeout


class ProviderError(ImageTaskError):
    """One generation call failed.

    Attributes:
        code: One of the error codes in ``Task.error.code`` (``"rate_limited"``, ...).
        retryable: Whether another attempt may succeed (429, 5xx, timeouts).
        retry_after: Seconds the provider asked us to wait before retrying, if it said.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class StoreError(ImageTaskError):
    """The task database cannot be used (not SQLite, written by a newer version, ...)."""


class StoreClosed(StoreError):
    """The store was closed before the operation ran: nothing of it was written."""

    def __init__(self, message: str = "the store is closed") -> None:
        super().__init__(message)


for _cls in (
    ConfigError,
    ImageTaskError,
    InsufficientCredits,
    ProviderError,
    StoreError,
    TaskNotFound,
    TooManyPending,
    ValidationError,
    WaitTimeout,
):
    _cls.__module__ = "imagetask"
del _cls
