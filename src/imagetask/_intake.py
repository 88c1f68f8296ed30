"""Turning requests into rows: validation, pricing and the reference copies before a submit's
transaction, and the queued snapshot a submit answers with after it."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ._exceptions import ConfigError, ImageTaskError, StoreClosed, StoreError, ValidationError
from ._ids import new_task_id, new_task_ids
from ._images import ImageStore, read_reference
from ._models import (
    GenerationRequest,
    StoredImage,
    Task,
    _build_queued,
    _from_ms,
    _json_object,
    check_request,
)
from ._store import SubmitRow, Submitted
from .providers.base import Provider

T = TypeVar("T")

__all__ = ["Intake", "called", "failure_of", "queued_task", "the_one", "to_the_end"]

#: How many checks `Intake` remembers before it starts over (request shapes and owners).
_MAX_CHECKED = 4096


class Intake:
    """Prepares the rows of one manager's submits (its provider's models, its image store,
    its attempt budget and whether credits are charged)."""

    def __init__(
        self, provider: Callable[[], Provider | None], images: ImageStore, max_attempts: int, charging: bool
    ) -> None:
        self._get_provider = provider
        self._images = images
        self._max_attempts = max_attempts
        self._charging = charging
        #: Checks already made (a request shape's model check, an owner's text check), for
        #: the provider they were made against; see `check_request`. Bounded: cleared when full.
        self._checked: dict[Any, Any] = {}
        self._checked_for: Provider | None = None

    async def prepare(self, req: GenerationRequest, task_id: str | None = None) -> SubmitRow:
        """Validate, price, and copy reference images: everything before the transaction."""
        self._provider()
        datas: tuple[bytes, ...] = ()
        if req.images:
            datas = tuple(
                await asyncio.to_thread(
                    lambda: [read_reference(item, i) for i, item in enumerate(req.images)]
                )
            )
        row = self.make_row(req, datas, task_id=task_id)
        if datas:
            # A caller cancelled meanwhile waits for the copies being written, then deletes
            # them: a cancelled submit leaves no file behind. (A plain future, not a task: a
            # loop shutting down cancels every task, and would cancel the wait, not the copy.)
            copying = asyncio.get_running_loop().run_in_executor(None, self._write_references, row.id, datas)
            if await to_the_end(copying):
                if failure_of(copying) is None:
                    self._images.delete([im.path for im in copying.result()])
                raise asyncio.CancelledError()
            row = row._replace(references=tuple(copying.result()))
        return row

    def _write_references(self, task_id: str, datas: tuple[bytes, ...]) -> list[StoredImage]:
        """Copy reference images into the store (on a worker thread); a storage fault deletes
        the copies made so far and is a `StoreError` naming the folder and the reason."""
        refs: list[StoredImage] = []
        for i, data in enumerate(datas):
            try:
                refs.append(self._images.write_reference(task_id, i, data))
            except OSError as exc:
                self._images.delete([im.path for im in refs])
                raise StoreError(
                    f"images[{i}]: the reference image could not be stored in {self._images.root} "
                    f"({exc.strerror or exc}); free space or fix the folder, then submit again "
                    "(nothing was written)"
                ) from None
        return refs

    def make_row(
        self, req: GenerationRequest, datas: tuple[bytes, ...], task_id: str | None = None
    ) -> SubmitRow:
        """Validate and price one request (reference images already read) into a row."""
        provider, shapes = self._checking()
        return self._row(req, datas, task_id or new_task_id(), provider, shapes)

    def _checking(self) -> tuple[Provider, dict[Any, Any]]:
        """The provider requests are checked against, and the checks already made for it."""
        provider = self._provider()
        if provider is not self._checked_for or len(self._checked) > _MAX_CHECKED:
            self._checked, self._checked_for = {}, provider
        return provider, self._checked

    def _row(
        self,
        req: GenerationRequest,
        datas: tuple[bytes, ...],
        task_id: str,
        provider: Provider,
        shapes: dict[Any, Any],
    ) -> SubmitRow:
        checked = check_request(req, provider.models, provider.default_model, datas, shapes)
        key = checked.idempotency_key
        # Positional, in the field order of SubmitRow (a submit_many makes one per request).
        return SubmitRow(
            task_id,
            checked.owner,
            checked.prompt,
            checked.model,
            checked.params,
            self._max_attempts,
            checked.cost,
            self._charging,
            key,
            None if key is None else checked.fingerprint(),
            checked.metadata_json,
            (),
            checked.params_json,
            provider.name,
        )

    def _provider(self) -> Provider:
        provider = self._get_provider()
        if provider is None:
            raise ConfigError(
                "this manager has no provider, so it cannot validate or run new tasks; pass "
                "provider=... (GeminiProvider() or FakeProvider()) or set GEMINI_API_KEY"
            )
        return provider

    async def prepare_many(self, items: list[GenerationRequest]) -> list[SubmitRow]:
        """`prepare` every request of a `submit_many`; on the first error, the reference
        copies made so far are deleted and the error names the request
        (``requests[3].prompt: ...``)."""
        rows: list[SubmitRow] = []
        try:
            ids = new_task_ids(len(items))
            provider, shapes = self._checking()
            make = self._row
            for i, item in enumerate(items):
                try:
                    # No reference images: nothing to read or copy, so no thread hop either.
                    rows.append(
                        make(item, (), ids[i], provider, shapes)
                        if not item.images
                        else await self.prepare(item, ids[i])
                    )
                except ValidationError as exc:
                    raise ValidationError(f"requests[{i}].{exc.field}", str(exc).split(": ", 1)[1]) from None
            _check_keys_within(rows)
        except BaseException:
            for row in rows:
                await self.discard(row)
            raise
        return rows

    async def discard_unwritten(
        self,
        rows: Sequence[SubmitRow],
        failure: BaseException,
        statuses: Callable[[Sequence[str]], Awaitable[dict[str, str]]],
    ) -> None:
        """Delete the reference copies of rows a write that ended in ``failure`` did not
        write. A write refused by a closed store wrote nothing; any other may still have
        committed (its answer lost after the commit): rows the database holds (``statuses``)
        keep their files. When it cannot tell, the copies stay: an orphan copy is swept by
        prune, while a row without its files fails its task."""
        copied = [row for row in rows if row.references]
        if not copied or isinstance(failure, asyncio.CancelledError):
            # The write itself was cancelled (the loop shutting down): its commit may still
            # land, so which rows it wrote cannot be told yet. Keep the copies.
            return
        try:
            written = {} if isinstance(failure, StoreClosed) else await statuses([row.id for row in copied])
        except Exception:
            return
        for row in copied:
            if row.id not in written:
                await self.discard(row)

    async def discard(self, row: SubmitRow) -> None:
        """Delete the reference copies of a row that was not written."""
        if row.references:
            await asyncio.to_thread(self._images.delete, [im.path for im in row.references])


#: The rows of one transaction share its time: one datetime for a whole submit_many.
_created_at = functools.lru_cache(maxsize=4)(_from_ms)


def queued_task(row: SubmitRow, at_ms: int) -> Task:
    """The snapshot of a row just committed, built before any worker is woken: submit
    always answers `queued`, without another read."""
    return _build_queued(
        id=row.id,
        owner=row.owner,
        prompt=row.prompt,
        model=row.model,
        params=row.params,
        references=row.references,
        max_attempts=row.max_attempts,
        cost=row.cost,
        metadata=_json_object(row.metadata_json),
        idempotency_key=row.idempotency_key,
        created_at=_created_at(at_ms),
    )


async def called(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """``await fn(*args, **kwargs)``, as a coroutine: run as a task, even an error ``fn``
    raises before returning its awaitable is the task's (a store method may be a plain
    function returning a future)."""
    return await fn(*args, **kwargs)


def the_one(results: list[Submitted | ImageTaskError]) -> Submitted:
    """The result of a one-row submit; its error raised."""
    (result,) = results
    if isinstance(result, BaseException):
        raise result
    return result


async def to_the_end(fut: asyncio.Future[Any]) -> bool:
    """Wait until ``fut`` is done even if the caller is cancelled meanwhile (a commit in
    flight cannot be recalled: its caller must learn whether it happened). Returns whether
    the caller was cancelled; it then re-raises the cancellation itself."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The caller's cancellation, even when fut ended in the same turn (then the
            # caller still gets it, after its result is dealt with); not fut's own.
            if not fut.cancelled():
                cancelled = True
        except BaseException:  # fut failed: the caller reads it from fut
            if not fut.done():
                raise  # not fut's error (GeneratorExit as the coroutine is closed, ...)
    return cancelled


def failure_of(fut: asyncio.Future[Any]) -> BaseException | None:
    """The exception a done future ended with, cancellation included."""
    return asyncio.CancelledError() if fut.cancelled() else fut.exception()


def _check_keys_within(rows: Sequence[SubmitRow]) -> None:
    """Two requests of one batch under one owner's idempotency key must be the same request
    (the second then answers the first's task); a different one is refused before writing."""
    first: dict[tuple[str, str], tuple[int, str | None]] = {}
    for i, row in enumerate(rows):
        if row.idempotency_key is None:
            continue
        j, fingerprint = first.setdefault((row.owner, row.idempotency_key), (i, row.fingerprint))
        if fingerprint != row.fingerprint:
            raise ValidationError(
                f"requests[{i}].idempotency_key",
                f"repeats the key of requests[{j}] for a different request; give each request its own key",
            )
