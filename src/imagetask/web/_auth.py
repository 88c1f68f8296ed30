"""Who a request acts as: a bearer token, the embedding app's own ``auth`` callable, or a
short-lived stream ticket (a browser's EventSource cannot send an Authorization header)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import inspect
import time
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection

from .. import TaskManager
from ._errors import ApiError

__all__ = ["Auth", "AuthCallable"]

#: The embedding app's sign-in: the owner a request acts as, or None (then 401).
AuthCallable = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]

#: How long a stream ticket may be used to (re)connect, in seconds.
TICKET_SECONDS = 300


class Auth:
    """Resolves the owner of each request, or raises a 401 `ApiError`."""

    def __init__(self, manager: TaskManager, auth: AuthCallable | None, secret: bytes) -> None:
        self._manager = manager
        self._auth = auth
        self._secret = secret

    async def owner(self, conn: HTTPConnection, *, ticket: bool = False) -> str:
        """The owner ``conn`` acts as. ``ticket``: a ``?ticket=`` from `ticket_for` counts too."""
        header = conn.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized("use the header 'Authorization: Bearer <token>'")
            owner = await self._manager.tokens.owner_of(token.strip())
            if owner is None:
                raise unauthorized("the token is unknown or revoked")
            return owner
        if ticket and "ticket" in conn.query_params:
            owner = self._check_ticket(conn.query_params["ticket"])
            if owner is None:
                raise unauthorized("the stream ticket is invalid or expired; ask for a new one")
            return owner
        if self._auth is not None:
            found = self._auth(conn)
            if inspect.isawaitable(found):
                found = await found
            if isinstance(found, str) and found:
                return found
        raise unauthorized("sign in, or send 'Authorization: Bearer <token>' (imagetask token create OWNER)")

    def ticket_for(self, owner: str) -> str:
        """A ticket that lets a stream connect as ``owner`` for `TICKET_SECONDS`."""
        name = base64.urlsafe_b64encode(owner.encode()).decode().rstrip("=")
        expires = int(time.time()) + TICKET_SECONDS
        return f"{name}.{expires}.{self._sign(name, expires)}"

    def _check_ticket(self, ticket: str) -> str | None:
        parts = ticket.split(".")
        if len(parts) != 3 or not ticket.isascii() or not parts[1].isdigit() or len(parts[1]) > 12:
            return None
        name, expires, signature = parts[0], int(parts[1]), parts[2]
        if (
            not hmac.compare_digest(signature.encode(), self._sign(name, expires).encode())
            or expires < time.time()
        ):
            return None
        try:
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except ValueError:
            return None

    def _sign(self, name: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{name}.{expires}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})
