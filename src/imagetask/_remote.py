"""RemoteTaskManager: the `TaskManager` methods over HTTP, against an ``imagetask serve`` (or an
app that mounts ``imagetask.web.create_app``)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import platformdirs

from . import _config
from ._checks import _as_image_list, _check_arg_seconds, _check_id, _iterable
from ._exceptions import (
    ConfigError,
    ImageTaskError,
    InsufficientCredits,
    StoreError,
    TaskNotFound,
    TooManyPending,
    ValidationError,
    WaitTimeout,
)
from ._images import read_reference
from ._models import (
    _STATUSES,
    GenerationRequest,
    ImageInput,
    StoredImage,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
)

__all__ = ["RemoteCredits", "RemoteTaskManager"]

log = logging.getLogger("imagetask")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_SERVER_LIMIT = "is set by the server over HTTP (create_app(max_pending=...))"
_EXT = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class RemoteCredits:
    """The caller's credit balance through the web app (``rtm.credits``)."""

    def __init__(self, manager: RemoteTaskManager) -> None:
        self._manager = manager

    async def balance(self, owner: str | None = None) -> int:
        """The signed-in owner's balance (``owner``, if given, must be that owner)."""
        self._manager._check_owner(owner)
        return int((await self._manager._get("/api/credits"))["balance"])

    async def grant(self, owner: str, amount: int) -> int:
        """Not available over HTTP: credits are granted where the database is
        (``imagetask credits grant``, or ``TaskManager.credits.grant``)."""
        raise ConfigError(
            "credits cannot be granted over HTTP; use `imagetask credits grant OWNER AMOUNT` "
            "where the database is, or TaskManager.credits.grant"
        )


class RemoteTaskManager:
    """The async `TaskManager` methods over HTTP: same arguments, same `Task` objects, same
    exceptions, so code moves between local and remote by changing one line.

    Every request acts as the owner of ``token``. Images of the tasks it returns are
    downloaded once into ``images`` (by their SHA-256, checked), so ``task.images[0].path``
    is a real file, as with a local manager; each image's ``url`` says where the server keeps
    it. `wait` and `as_completed` listen on the server's event stream, and poll every
    ``poll_interval`` seconds while the stream is down.

    Args:
        base_url: Where the app is (``http://127.0.0.1:8000``, or its mount prefix).
        token: A token from ``imagetask token create OWNER``; None when ``headers`` sign the
            requests in another way.
        images: The download folder (default: ``imagetask/remote`` in the user's cache folder,
            such as ``~/.cache/imagetask/remote``).
        download: False to leave images on the server: each image's ``url`` is then where
            to get it, and its ``path`` (where it would have been saved) does not exist.
        timeout: Seconds for each HTTP request.
        poll_interval: Seconds between polls while the event stream is unavailable.
        headers: More headers for every request.
        transport: An httpx transport (tests, proxies).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        images: str | os.PathLike[str] | None = None,
        download: bool = True,
        timeout: float = 30.0,
        poll_interval: float = 3.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url: must be an http:// or https:// URL, got {base_url!r}")
        _check_arg_seconds("poll_interval", poll_interval)
        self.base_url = base_url.rstrip("/")
        root = (
            Path(images) if images is not None else Path(platformdirs.user_cache_dir("imagetask")) / "remote"
        )
        self.images_root = root.expanduser().absolute()
        self.download = download
        self.poll_interval = poll_interval
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=sent, timeout=timeout, transport=transport
        )
        self.credits = RemoteCredits(self)
        #: The owner the server says these requests act as (read at `open`).
        self.owner: str | None = None
        self._open = False

    def __repr__(self) -> str:
        return f"RemoteTaskManager({self.base_url!r}, owner={self.owner!r})"

    async def open(self) -> RemoteTaskManager:
        """Ask the server who the token acts as.

        Raises:
            ConfigError: the server refused the credentials.
            StoreError: the server cannot be reached, or is not an imagetask app.
        """
        try:
            me = await self._get("/api/me")
        except BaseException:
            await self._client.aclose()  # a failed open leaves no connection behind
            raise
        self.owner = str(me["owner"])
        self._open = True
        return self

    async def aclose(self) -> None:
        """Close the HTTP connections (the server's tasks go on)."""
        self._open = False
        await self._client.aclose()

    async def __aenter__(self) -> RemoteTaskManager:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- submit --

    async def submit(
        self,
        prompt: str,
        *,
        n: int = 1,
        model: str | None = None,
        aspect_ratio: str | None = None,
        size: str | None = None,
        images: ImageInput | Sequence[ImageInput] = (),
        owner: str | None = None,
        idempotency_key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        max_pending: int | None = None,
    ) -> Task:
        """Same as `TaskManager.submit`; ``owner`` defaults to the token's, and the server
        sets ``max_pending``."""
        self._check_owner(owner)
        if max_pending is not None:
            raise ValidationError(
                "max_pending", "is set by the server over HTTP (create_app(max_pending=...))"
            )
        fields = _fields(prompt, n, model, aspect_ratio, size, idempotency_key, metadata)
        items = _as_image_list(images) if images else ()
        if not items:
            return await self._task(await self._send("POST", "/api/tasks", json=fields))
        datas = await asyncio.to_thread(lambda: [read_reference(item, i) for i, item in enumerate(items)])
        form = {k: (json.dumps(v) if k == "metadata" else str(v)) for k, v in fields.items()}
        files = [("images", (f"ref-{i}", data, "application/octet-stream")) for i, data in enumerate(datas)]
        return await self._task(await self._send("POST", "/api/tasks", data=form, files=files))

    async def submit_many(
        self, requests: Iterable[GenerationRequest | Mapping[str, Any]], *, max_pending: int | None = None
    ) -> builtins.list[Task]:
        """Same as `TaskManager.submit_many` (all written, or none); reference images are
        sent with `submit`, one task at a time."""
        if max_pending is not None:
            raise ValidationError(
                "max_pending", "is set by the server over HTTP (create_app(max_pending=...))"
            )
        batch = []
        for i, item in enumerate(_iterable("requests", requests)):
            req = GenerationRequest._coerce(item, i)
            if req.images:
                raise ValidationError(
                    f"requests[{i}].images", "send requests with reference images with submit()"
                )
            self._check_owner(req.owner)
            batch.append(
                _fields(
                    req.prompt,
                    req.n,
                    req.model,
                    req.aspect_ratio,
                    req.size,
                    req.idempotency_key,
                    req.metadata,
                )
            )
        found = await self._send("POST", "/api/tasks/batch", json={"requests": batch})
        return [await self._task(item) for item in found["tasks"]]

    # -- reads --

    async def poll(self, task_id: str) -> Task:
        """Same as `TaskManager.poll`: one request."""
        task_id = _path_id(task_id)
        return await self._task(await self._get(f"/api/tasks/{task_id}", task_id=task_id))

    async def pending(self, owner: str | None = None) -> builtins.list[Task]:
        """Same as `TaskManager.pending`, for the token's owner."""
        self._check_owner(owner)
        return [await self._task(t) for t in (await self._get("/api/tasks/pending"))["tasks"]]

    async def list(
        self,
        owner: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> builtins.list[Task]:
        """Same as `TaskManager.list`, for the token's owner (up to 200 a page)."""
        self._check_owner(owner)
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = TaskStatus(status).value if isinstance(status, TaskStatus) else status
        if before is not None:
            params["before"] = before
        return [await self._task(t) for t in (await self._get("/api/tasks", params=params))["tasks"]]

    async def events(self, task_id: str) -> tuple[TaskEvent, ...]:
        """Same as `TaskManager.events`."""
        task_id = _path_id(task_id)
        found = await self._get(f"/api/tasks/{task_id}/events", task_id=task_id)
        return tuple(_event(e) for e in found["events"])

    async def cancel(self, task_id: str) -> Task:
        """Same as `TaskManager.cancel`."""
        task_id = _path_id(task_id)
        return await self._task(await self._send("POST", f"/api/tasks/{task_id}/cancel", task_id=task_id))

    async def wait(self, task_id: str, timeout: float | None = None) -> Task:
        """Same as `TaskManager.wait`: told by the server's event stream, polling while it is down."""
        if timeout is not None:
            _check_arg_seconds("timeout", timeout)
        task_id = _check_id(task_id)
        try:
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self._until_done([task_id])) as done:
                    async for task in done:
                        return task
        except TimeoutError:
            assert timeout is not None
            raise WaitTimeout(task_id, timeout) from None
        raise ImageTaskError(
            f"stopped waiting for {task_id}"
        )  # pragma: no cover - _until_done ends only when done

    async def as_completed(
        self, ids: Iterable[str], timeout: float | None = None
    ) -> AsyncGenerator[Task, None]:
        """Same as `TaskManager.as_completed`."""
        if timeout is not None:
            _check_arg_seconds("timeout", timeout)
        wanted = list(dict.fromkeys(_check_id(task_id) for task_id in _iterable("ids", ids)))
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                async with contextlib.aclosing(self._until_done(wanted)) as done:
                    async for task in done:
                        yield task
        except TimeoutError:
            raise WaitTimeout(", ".join(wanted), timeout or 0.0) from None

    async def _until_done(self, ids: builtins.list[str]) -> AsyncGenerator[Task, None]:
        """Each of ``ids`` once it is terminal: from the stream, polling while it is down.

        The stream is opened before the first poll, so a task that ends in between is seen
        by one or the other; a reconnect resumes after the last event seen.
        """
        left = set(ids)
        last: int | None = None
        first = True
        while left:
            try:
                headers = {} if last is None else {"Last-Event-ID": str(last)}
                async with self._client.stream("GET", "/api/stream", headers=headers, timeout=None) as stream:
                    if stream.status_code != 200:
                        await stream.aread()
                        self._raise_for(stream)
                    lines = stream.aiter_lines()
                    await anext(lines)  # "retry: ...": the server has subscribed this stream
                    for task in await self._poll_all(left, first):
                        left.discard(task.id)
                        yield task
                    first = False
                    data: str | None = None
                    async for line in lines:
                        if line.startswith(":"):  # a keepalive: look, in case an event was missed
                            for task in await self._poll_all(left, False):
                                left.discard(task.id)
                                yield task
                            if not left:
                                return
                        elif line.startswith("id: "):
                            last = int(line[4:])
                        elif line.startswith("data: "):
                            data = line[6:]
                        elif not line and data is not None:
                            message = json.loads(data)
                            data = None
                            raw = message.get("task")
                            if message.get("task_id") in left and raw and TaskStatus(raw["status"]).terminal:
                                task = await self._task(raw)
                                left.discard(task.id)
                                yield task
                                if not left:
                                    return
            except (httpx.TransportError, StopAsyncIteration, StoreError) as exc:
                log.info(
                    "the event stream of %s is down (%s); polling every %g s",
                    self.base_url,
                    exc,
                    self.poll_interval,
                )
                try:
                    for task in await self._poll_all(left, first):
                        left.discard(task.id)
                        yield task
                    first = False
                except StoreError as down:  # the server itself is away (a restart): wait for it
                    log.info("%s; trying again in %g s", down, self.poll_interval)
                if left:
                    await asyncio.sleep(self.poll_interval)

    async def _poll_all(self, ids: set[str], strict: bool) -> builtins.list[Task]:
        """The terminal ones among ``ids``; with ``strict``, an unknown id raises first."""
        found = await asyncio.gather(*(self.poll(task_id) for task_id in sorted(ids)))
        return [task for task in found if task.done]

    # -- HTTP --

    def _check_owner(self, owner: str | None) -> None:
        # The local default owner's name stands for "whoever the token is" (the blocking door
        # passes it when the caller named no owner).
        if owner is not None and owner != self.owner and owner != _config.DEFAULT_OWNER:
            raise ValidationError(
                "owner",
                f"this RemoteTaskManager acts as {self.owner!r} (its token's owner), not {owner!r}; "
                "use a token of that owner",
            )

    async def _get(self, path: str, *, task_id: str | None = None, params: Any = None) -> Any:
        return await self._send("GET", path, task_id=task_id, params=params)

    async def _send(self, method: str, path: str, *, task_id: str | None = None, **kw: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise StoreError(f"cannot reach {self.base_url} ({type(exc).__name__}: {exc})") from None
        self._raise_for(response, task_id)
        return response.json()

    def _raise_for(self, response: httpx.Response, task_id: str | None = None) -> None:
        """Raise what a local manager would have raised for this answer."""
        if response.status_code < 400:
            return
        try:
            error = response.json()["error"]
            code, message, field = error["code"], error["message"], error.get("field")
            details = error.get("details") or {}
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                f"{self.base_url} answered {response.status_code}: {response.text[:200]}"
            ) from None
        status = response.status_code
        if status == 404 and task_id is not None:
            raise TaskNotFound(task_id)
        if status == 422 or (status == 400 and field):
            raise ValidationError(field or "body", message)
        if status == 402:
            raise InsufficientCredits(
                details.get("owner", self.owner or ""), details.get("cost", 0), details.get("balance", 0)
            )
        if status == 429:
            raise TooManyPending(
                details.get("owner", self.owner or ""), details.get("pending", 0), details.get("limit", 0)
            )
        if status == 401:
            raise ConfigError(f"{self.base_url} refused the credentials: {message}")
        raise StoreError(f"{self.base_url} answered {status} {code}: {message}")

    # -- tasks from JSON --

    async def _task(self, data: Mapping[str, Any]) -> Task:
        task_id = _task_id(data.get("id"))
        images = tuple(self._image(task_id, "images", i, im) for i, im in enumerate(data["images"]))
        references = tuple(
            self._image(task_id, "references", i, im) for i, im in enumerate(data.get("references", ()))
        )
        if self.download:
            # One download per file: a task may hold the same picture twice (the same sha256).
            unique = {im.path: im for im in images + references}
            await asyncio.gather(*(self._fetch(im) for im in unique.values()))
        error = data.get("error")
        return Task(
            id=data["id"],
            owner=data["owner"],
            prompt=data["prompt"],
            model=data["model"],
            params=dict(data.get("params") or {}),
            status=_STATUSES[data["status"]],
            images=images,
            references=references,
            error=None
            if error is None
            else TaskError(error["code"], error["message"], bool(error.get("retryable"))),
            attempts=data.get("attempts", 0),
            max_attempts=data.get("max_attempts", 0),
            cost=data.get("cost", 0),
            metadata=dict(data.get("metadata") or {}),
            idempotency_key=data.get("idempotency_key"),
            created_at=_time(data.get("created_at")),
            started_at=_time(data.get("started_at")),
            finished_at=_time(data.get("finished_at")),
        )

    def _image(self, task_id: str, kind: str, index: int, data: Mapping[str, Any]) -> StoredImage:
        """An image of a task from the server's JSON. Its file name comes from its digest,
        checked to be one; its URL is built here from the task id and index, never taken
        from the answer (which could point the token at another host)."""
        sha, mime = data.get("sha256"), data.get("mime")
        if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None or mime not in _EXT:
            raise StoreError(
                f"{self.base_url} described an image of task {task_id} with a bad sha256 or mime"
            )
        return StoredImage(
            path=self.images_root / sha[:2] / f"{sha}{_EXT[mime]}",
            mime=mime,
            width=data["width"],
            height=data["height"],
            sha256=sha,
            size=data["size"],
            index=index,
            url=f"{self.base_url}/api/tasks/{task_id}/{kind}/{index}",
        )

    async def _fetch(self, image: StoredImage) -> None:
        """Download ``image`` into the cache once, checking its SHA-256."""
        if image.path.is_file():
            return
        assert image.url is not None
        try:
            response = await self._client.get(image.url)
        except httpx.TransportError as exc:
            raise StoreError(f"cannot download {image.url} ({exc})") from None
        self._raise_for(response)
        data = response.content
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise StoreError(f"{image.url}: the downloaded bytes do not match the image's sha256")
        await asyncio.to_thread(_write_atomically, image.path, data)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name of its own, then rename: a reader never sees half a file,
    and two writers of the same file (two tasks with one picture) both end whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _task_id(value: object) -> str:
    """A task id as the server may send it: letters and digits only (it goes into URLs)."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise StoreError(f"the server sent a task id that is not one: {str(value)[:40]!r}")
    return value


def _path_id(task_id: str) -> str:
    """``task_id`` for a URL path: an id with other characters than letters and digits is
    no task's (and could escape the path), so it is not found, without asking."""
    task_id = _check_id(task_id)
    if _ID.fullmatch(task_id) is None:
        raise TaskNotFound(task_id)
    return task_id


def _fields(
    prompt: str,
    n: int,
    model: str | None,
    aspect_ratio: str | None,
    size: str | None,
    idempotency_key: str | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": prompt, "n": n}
    for name, value in (
        ("model", model), ("aspect_ratio", aspect_ratio), ("size", size),
        ("idempotency_key", idempotency_key), ("metadata", None if metadata is None else dict(metadata)),
    ):  # fmt: skip
        if value is not None:
            fields[name] = value
    return fields


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def _event(data: Mapping[str, Any]) -> TaskEvent:
    return TaskEvent(
        task_id=data["task_id"],
        at=datetime.fromisoformat(data["at"].replace("Z", "+00:00")),
        kind=data["kind"],
        attempt=data["attempt"],
        status=_STATUSES[data["status"]],
        worker=data.get("worker"),
        detail=data.get("detail"),
        seq=data.get("seq", 0),
    )


RemoteTaskManager.__module__ = "imagetask"
RemoteCredits.__module__ = "imagetask"
