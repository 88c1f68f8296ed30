"""What the manager hands back besides tasks: prune reports, database health, and the credits
door (``tm.credits``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import _config
from ._checks import _check_owner
from ._exceptions import ValidationError
from ._models import TaskStatus

if TYPE_CHECKING:
    from ._manager import TaskManager

__all__ = ["Credits", "Health", "PruneReport"]

log = logging.getLogger("imagetask")


@attrs.frozen
class PruneReport:
    """What ``prune`` removed.

    Attributes:
        tasks: Finished tasks deleted (with their images and events).
        files: Image files deleted for those tasks.
        orphans: Files no row pointed to (left by crashes or lost attempts) deleted.
        thumbnails: The web app's cached thumbnails of images no longer kept, deleted (from
            its default folder, beside the image folder).
    """

    tasks: int
    files: int
    orphans: int
    thumbnails: int = 0


@attrs.frozen
class Health:
    """What ``health()`` found in the database (``imagetask doctor`` prints it).

    Attributes:
        path: The database file.
        images_root: The image folder.
        schema_version: The schema version recorded in the database.
        integrity: ``"ok"``, or what SQLite's ``quick_check`` reported.
        wal_bytes: The size of the write-ahead log file.
        counts: Tasks by status (every status, zeros included).
        expired_leases: Running tasks whose lease has expired (their worker stopped); any
            manager with workers takes them back.
        durability: What this manager's writes run with, as SQLite reports it:
            ``"normal"`` (a commit survives a process crash) or ``"full"`` (also power loss).
    """

    path: Path
    images_root: Path
    schema_version: int
    integrity: str
    wal_bytes: int
    counts: Mapping[str, int]
    expired_leases: int
    durability: str = "normal"

    @property
    def ok(self) -> bool:
        """True when the integrity check passed."""
        return self.integrity == "ok"

    @classmethod
    def _of(cls, path: Path, images_root: Path, found: Mapping[str, Any]) -> Health:
        """The report of what `TaskStore.health` found (every status counted, zeros too)."""
        counts = {status.value: found["counts"].get(status.value, 0) for status in TaskStatus}
        return cls(
            path=path,
            images_root=images_root,
            schema_version=found["schema_version"],
            integrity=found["integrity"],
            wal_bytes=found["wal_bytes"],
            counts=counts,
            expired_leases=found["expired_leases"],
            durability=found["durability"],
        )


class Credits:
    """Per-owner credit balances, kept as an append-only ledger (``tm.credits``)."""

    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager

    async def grant(self, owner: str, amount: int) -> int:
        """Add ``amount`` credits to ``owner`` (negative to take some away).

        Returns:
            The new balance.

        Raises:
            ValidationError: for a bad owner or amount, or a balance that would go negative.
        """
        _check_owner(owner)
        limit = _config.MAX_CREDITS
        if isinstance(amount, bool) or not isinstance(amount, int) or amount == 0 or abs(amount) > limit:
            raise ValidationError(
                "amount", f"must be a non-zero integer from -10**12 to 10**12, got {amount!r}"
            )
        store = self._manager._require_open()
        balance = await store.grant(owner, amount)
        log.info("credits: %+d for %s, balance %d", amount, owner, balance)
        return balance

    async def balance(self, owner: str) -> int:
        """The owner's balance (0 if it was never granted anything)."""
        _check_owner(owner)
        return await self._manager._require_open().balance(owner)


PruneReport.__module__ = "imagetask"
Health.__module__ = "imagetask"
