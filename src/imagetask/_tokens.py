"""API tokens (``tm.tokens``): random secrets for the web door, kept only as digests."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import attrs

from ._checks import _check_owner
from ._exceptions import ValidationError
from ._store import WOULD_WAIT

if TYPE_CHECKING:
    from ._manager import TaskManager
    from ._store.tokens import TokenRow

__all__ = ["TokenInfo", "Tokens"]

log = logging.getLogger("imagetask")

#: ``itk_<id>_<secret>``: the id (public, 12 characters) finds the row, the secret (256 random
#: bits) is what proves the holder; the database keeps only the SHA-256 of the whole token.
_TOKEN = re.compile(r"itk_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")
_ID = re.compile(r"(?:itk_)?([a-z2-7]{12})")
_MAX_LABEL = 200


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _new_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return "".join(secrets.choice(alphabet) for _ in range(12))


def _time(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


@attrs.frozen
class TokenInfo:
    """What is known of one token: never the token itself.

    Attributes:
        id: Its public id (the part after ``itk_``); ``revoke`` takes it.
        owner: Whom a request carrying it acts as.
        label: A note given at creation (``"ci"``, ``"alice's laptop"``), or None.
        created_at: When it was created (UTC).
        revoked_at: When it was revoked, or None while it is valid.
    """

    id: str
    owner: str
    label: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def valid(self) -> bool:
        """True until it is revoked."""
        return self.revoked_at is None

    @classmethod
    def _from_row(cls, row: TokenRow) -> TokenInfo:
        token_id, owner, _, label, created, revoked = row
        created_at = _time(created)
        assert created_at is not None
        return cls(id=token_id, owner=owner, label=label, created_at=created_at, revoked_at=_time(revoked))


class Tokens:
    """API tokens for the web door (``tm.tokens``): each acts as one owner.

    A token is shown once, by `create`; the database keeps only its SHA-256 digest, and
    `owner_of` compares digests in constant time. Revoked tokens stop working at once, in
    every process sharing the database.
    """

    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager

    async def create(self, owner: str, *, label: str | None = None) -> str:
        """A new token acting as ``owner``: keep it, it cannot be shown again.

        Raises:
            ValidationError: for a bad owner or label.
        """
        _check_owner(owner)
        if label is not None and (not isinstance(label, str) or len(label) > _MAX_LABEL):
            raise ValidationError("label", f"must be a string of at most {_MAX_LABEL} characters, or None")
        store = self._manager._require_open()
        token_id = _new_id()
        token = f"itk_{token_id}_{secrets.token_urlsafe(32)}"
        await store.add_token(token_id, owner, _digest(token), label)
        log.info("token %s created for %s", token_id, owner)  # the id only, never the secret
        return token

    async def owner_of(self, token: str) -> str | None:
        """The owner ``token`` acts as, or None when it is malformed, unknown or revoked."""
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        store = self._manager._require_open()
        row = store.try_token(match[1])
        if row is WOULD_WAIT:
            row = await store.token(match[1])
        if row is None:
            return None
        _, owner, digest, _, _, revoked = row
        if not hmac.compare_digest(_digest(token).encode(), digest.encode()) or revoked is not None:
            return None
        return owner

    async def get(self, token_id: str) -> TokenInfo | None:
        """What is known of the token with this id (revoked or not), or None."""
        if not isinstance(token_id, str) or _ID.fullmatch(token_id) is None:
            return None
        store = self._manager._require_open()
        found = store.try_token(token_id.removeprefix("itk_"))
        if found is WOULD_WAIT:
            found = await store.token(token_id.removeprefix("itk_"))
        return None if found is None else TokenInfo._from_row(found)

    async def revoke(self, token_or_id: str) -> bool:
        """Revoke a token, given the token or its id; False when there was no valid one.

        Raises:
            ValidationError: when ``token_or_id`` is neither.
        """
        match = _TOKEN.fullmatch(token_or_id) if isinstance(token_or_id, str) else None
        token_id = match[1] if match else None
        if token_id is None and isinstance(token_or_id, str):
            found = _ID.fullmatch(token_or_id)
            token_id = found[1] if found else None
        if token_id is None:
            raise ValidationError("token", "is neither a token (itk_...) nor a token id (12 characters)")
        revoked = await self._manager._require_open().revoke_tokens(token_id, None)
        if revoked:
            log.info("token %s revoked", token_id)
        return bool(revoked)

    async def revoke_owner(self, owner: str) -> int:
        """Revoke every valid token of ``owner``; returns how many."""
        _check_owner(owner)
        return await self._manager._require_open().revoke_tokens(None, owner)

    async def list(self, owner: str | None = None) -> list[TokenInfo]:
        """Every token (of ``owner``, if named), revoked ones included, oldest first."""
        if owner is not None:
            _check_owner(owner)
        return [TokenInfo._from_row(row) for row in await self._manager._require_open().tokens(owner)]


TokenInfo.__module__ = "imagetask"
Tokens.__module__ = "imagetask"
