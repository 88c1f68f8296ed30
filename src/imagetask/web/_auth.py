"""Who a request acts as: a bearer token, the embedding app's own ``auth`` callable, or a
short-lived stream ticket (a browser's EventSource cannot send an Authorization header)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from .. import TaskManager
from ._errors import ApiError

__all__ = ["Auth", "AuthCallable", "Identity"]

#: The embedding app's sign-in: the owner a request acts as, or None (then 401).
AuthCallable = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]

#: How long a stream ticket may be used to (re)connect, in seconds.
TICKET_SECONDS = 60

_UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class Identity(NamedTuple):
    """The owner a request acts as, and the id of the token that proved it (None when the
    embedding app's ``auth`` did)."""

    owner: str
    token_id: str | None


class Auth:
    """Resolves the owner of each request, or raises a 401 `ApiError`."""

    def __init__(self, manager: TaskManager, auth: AuthCallable | None, secret: bytes) -> None:
        self._manager = manager
        self._auth = auth
        self._secret = secret

    async def owner(self, conn: HTTPConnection) -> str:
        """The owner ``conn`` acts as."""
        return (await self.identity(conn)).owner

    async def identity(self, conn: HTTPConnection, *, ticket: bool = False) -> Identity:
        """Who ``conn`` acts as. ``ticket``: a ``?ticket=`` from `ticket_for` counts too.

        ``Authorization: Bearer itk_...`` is checked as an imagetask token; any other
        Authorization header is left to the embedding app's ``auth``. Writes signed in by
        ``auth`` (a session cookie, which a browser sends from any site) are refused when
        the browser says they come from another site.
        """
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token.startswith("itk_"):
                found = await self._manager.tokens.owner_of(token)
                if found is None:
                    raise unauthorized("the token is unknown or revoked")
                return Identity(found, token.split("_")[1])
            # Another scheme (a proxy's Basic auth) is not ours: a stream's ticket still counts.
            if self._auth is None and not (ticket and "ticket" in conn.query_params):
                raise unauthorized("use the header 'Authorization: Bearer <token>'")
        if ticket and "ticket" in conn.query_params:
            found_identity = await self._check_ticket(conn.query_params["ticket"])
            if found_identity is None:
                raise unauthorized("the stream ticket is invalid or expired; ask for a new one")
            return found_identity
        if self._auth is not None:
            owner = self._auth(conn)
            if inspect.isawaitable(owner):
                owner = await owner
            if isinstance(owner, str) and owner:
                if conn.scope.get("method") in _UNSAFE and _cross_site(conn):
                    raise ApiError(
                        403, "cross_site", "a write signed in by cookie must come from this site's own pages"
                    )
                return Identity(owner, None)
        raise unauthorized("sign in, or send 'Authorization: Bearer <token>' (imagetask token create OWNER)")

    async def still_valid(self, who: Identity) -> bool:
        """False once the token behind ``who`` has been revoked (always True for ``auth``)."""
        if who.token_id is None:
            return True
        info = await self._manager.tokens.get(who.token_id)
        return info is not None and info.valid and info.owner == who.owner

    def ticket_for(self, who: Identity) -> str:
        """A ticket that lets a stream connect as ``who`` for `TICKET_SECONDS` (and not once
        its token is revoked)."""
        name = base64.urlsafe_b64encode(who.owner.encode()).decode().rstrip("=")
        expires = int(time.time()) + TICKET_SECONDS
        token_id = who.token_id or ""
        return f"{name}.{expires}.{token_id}.{self._sign(name, expires, token_id)}"

    async def _check_ticket(self, ticket: str) -> Identity | None:
        parts = ticket.split(".")
        if len(parts) != 4 or not ticket.isascii() or not parts[1].isdigit() or len(parts[1]) > 12:
            return None
        name, expires, token_id, signature = parts[0], int(parts[1]), parts[2], parts[3]
        expected = self._sign(name, expires, token_id).encode()
        if not hmac.compare_digest(signature.encode(), expected) or expires < time.time():
            return None
        try:
            owner = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except ValueError:
            return None
        who = Identity(owner, token_id or None)
        return who if await self.still_valid(who) else None

    def _sign(self, name: str, expires: int, token_id: str) -> str:
        mac = hmac.new(self._secret, f"{name}.{expires}.{token_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def _cross_site(conn: HTTPConnection) -> bool:
    """Whether the browser says the request comes from another site: ``Sec-Fetch-Site``
    (every current browser sends it), else an ``Origin`` whose host is not this one."""
    site = conn.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "same-site", "none")
    origin = conn.headers.get("origin")
    if origin is None or origin == "null":
        return origin == "null"
    return urlsplit(origin).netloc != conn.headers.get("host", "")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
