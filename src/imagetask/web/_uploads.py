"""The multipart bodies (submits with reference images) the web app reads at once."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request

from ._errors import ApiError, read_body

__all__ = ["Uploads"]

#: Multipart submits read and parsed at once, in all (each is held in memory meanwhile).
UPLOADS_AT_ONCE = 4
#: Of those, at most this many for one owner: one owner's stalled uploads cannot take them all.
UPLOADS_PER_OWNER = 2


class Uploads:
    """A few multipart bodies at a time, at most two per owner, each received within
    ``timeout`` seconds: a client that stalls mid-body holds its slot only that long, and
    stalled clients of one owner never block another owner's uploads."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._all = asyncio.Semaphore(UPLOADS_AT_ONCE)
        self._owners: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def slot(self, owner: str) -> AsyncIterator[None]:
        """Hold one of the slots while a body is read and parsed (429 past the owner's share)."""
        if self._owners[owner] >= UPLOADS_PER_OWNER:
            raise ApiError(
                429,
                "too_many_uploads",
                f"owner {owner!r} already has {UPLOADS_PER_OWNER} uploads in progress; "
                "send this one when one of them has finished",
                headers={"Retry-After": "5"},
            )
        self._owners[owner] += 1
        try:
            async with self._all:
                yield
        finally:
            self._owners[owner] -= 1
            if not self._owners[owner]:
                del self._owners[owner]

    async def read(self, request: Request, limit: int) -> bytes:
        """The whole body (413 over ``limit`` bytes), or 408 if it is not all in within the
        timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                return await read_body(request, limit, "max_upload")
        except TimeoutError:
            raise ApiError(
                408,
                "upload_timeout",
                f"the upload was not all received within {self.timeout:g} s; send it again",
            ) from None
