"""The ASGI app: the JSON API, the seed's three endpoints, the event stream, image files and
the page, each route acting as the one owner its request is signed in as."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import ConfigError, GenerationRequest, Task, TaskManager, TaskNotFound, ValidationError
from .._checks import _check_seconds
from .._config import MAX_N
from .._images import thumbnail_folder
from .._jsonout import event_json, task_json
from ._auth import TICKET_SECONDS, Auth, AuthCallable
from ._errors import ApiError, AsciiJSON, digits, error_response, not_found, read_json
from ._files import Thumbnails, image_response
from ._openapi import openapi
from ._stream import Hub
from ._uploads import Uploads

__all__ = ["create_app"]


class _TaskIdConvertor(Convertor[str]):
    """A task id in a path: 26 letters and digits. Anything else is no task's, and a route
    such as ``/api/tasks/batch`` is not mistaken for one."""

    regex = "[0-9A-Za-z]{26}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("imagetask_id", _TaskIdConvertor())

STATIC = Path(__file__).with_name("static")
#: The fields a submit accepts (JSON, or multipart form fields beside the ``images`` files).
_SUBMIT_FIELDS = {"prompt", "n", "model", "aspect_ratio", "size", "metadata", "idempotency_key"}
_FIELD_LIST = ", ".join(sorted(_SUBMIT_FIELDS))
#: The most submits one batch may hold.
_MAX_BATCH = 100
#: The seed page's names for them.
_SEED_FIELDS = {
    "prompt": "prompt",
    "model": "model",
    "n": "n",
    "numberOfImages": "n",
    "aspectRatio": "aspect_ratio",
    "aspect_ratio": "aspect_ratio",
    "size": "size",
    "idempotencyKey": "idempotency_key",
}


def create_app(
    manager: TaskManager,
    *,
    auth: AuthCallable | None = None,
    max_body: int = 1024 * 1024,
    max_upload: int = 25 * 1024 * 1024,
    max_pending: int | None = 100,
    thumbnails: Path | None = None,
    secret: bytes | None = None,
    keepalive: float = 15.0,
    upload_timeout: float = 60.0,
) -> Starlette:
    """An ASGI app serving ``manager``'s tasks over HTTP.

    Mount it in your own Starlette or FastAPI app (``app.mount("/images", create_app(tm))``),
    or run it with ``imagetask serve``. When it runs on its own, its lifespan opens the
    manager if it is not open yet, and closes it at shutdown; when mounted, open and close
    the manager in your app's lifespan.

    Args:
        manager: The manager whose tasks it serves (``workers=False`` when an
            ``imagetask worker`` runs the work elsewhere).
        auth: Your app's own sign-in: ``auth(request) -> owner or None`` (may be async).
            Requests with ``Authorization: Bearer <token>`` (``imagetask token create``)
            are always accepted too.
        max_body: The largest JSON body, in bytes (413 above).
        max_upload: The largest multipart body (a submit with reference images), in bytes.
        max_pending: How many unfinished tasks one owner may have (429 above); None: no limit.
        thumbnails: Where downscaled images are cached (default: beside the image folder,
            where `TaskManager.prune` deletes those of the images it deletes; a folder of
            your own is not swept, and must be outside the image folder).
        secret: The key that signs stream tickets; give every process behind one address the
            same one (default: random for this app).
        keepalive: Seconds between the comments an idle stream gets (so proxies keep it);
            each also checks that the stream's token was not revoked meanwhile.
        upload_timeout: Seconds a multipart body may take to arrive (408 after): a client
            that stalls mid-upload holds one of the few upload slots only that long (at most
            two of them per owner).
    """
    _check_seconds("keepalive", keepalive, positive=True)
    _check_seconds("upload_timeout", upload_timeout, positive=True)
    thumbs = Thumbnails(_thumbnail_folder(thumbnails, manager.images_root), manager.images_root)
    access = Auth(manager, auth, secret or secrets.token_bytes(32))
    hub = Hub(manager, keepalive)
    # A multipart body is held in memory while it is parsed (the raw body, then the form's
    # copy): a few at a time keep a burst of big uploads from taking gigabytes.
    uploads = Uploads(float(upload_timeout))

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def as_json(request: Request) -> Any:
        prefix = base(request)

        def render(task: Task) -> dict[str, Any]:
            found = task_json(task)
            found["images"] = [
                {
                    "index": i,
                    "url": f"{prefix}/api/tasks/{task.id}/images/{i}",
                    "thumbnail_url": f"{prefix}/api/tasks/{task.id}/images/{i}?w=256",
                    **{k: v for k, v in image.items() if k != "path"},
                }
                for i, image in enumerate(found["images"])
            ]
            found["references"] = [
                {
                    "index": i,
                    "url": f"{prefix}/api/tasks/{task.id}/references/{i}",
                    **{k: v for k, v in image.items() if k != "path"},
                }
                for i, image in enumerate(found["references"])
            ]
            return found

        return render

    async def own_task(request: Request, owner: str) -> Task:
        task_id = request.path_params["task_id"]
        try:
            task = await manager.poll(task_id)
        except (TaskNotFound, ValidationError):
            raise not_found() from None
        if task.owner != owner:
            raise not_found()
        return task

    # -- the JSON API --

    async def submit(request: Request) -> Response:
        owner = await access.owner(request)
        fields, images = await _submit_input(request, owner, max_body, max_upload, uploads)
        key = request.headers.get("idempotency-key")
        if key is not None and "idempotency_key" not in fields:
            fields["idempotency_key"] = key
        task = await _submit(manager, owner, fields, images, max_pending)
        return AsciiJSON(as_json(request)(task), status_code=202)

    async def submit_batch(request: Request) -> Response:
        owner = await access.owner(request)
        body = await read_json(request, max_body)
        items = body.get("requests")
        if set(body) != {"requests"} or not isinstance(items, list) or not 1 <= len(items) <= _MAX_BATCH:
            raise ApiError(422, "invalid", f'send {{"requests": [1 to {_MAX_BATCH} submits]}}', "requests")
        requests = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(422, "invalid", "must be a JSON object", f"requests[{i}]")
            try:
                requests.append(_request(owner, _checked_fields(item)))
            except ApiError as exc:
                exc.field = f"requests[{i}].{exc.field}"
                raise
        tasks = await manager.submit_many(requests, max_pending=max_pending)
        render = as_json(request)
        return AsciiJSON({"tasks": [render(t) for t in tasks]}, status_code=202)

    async def tasks_route(request: Request) -> Response:
        return await (submit(request) if request.method == "POST" else list_tasks(request))

    async def get_task(request: Request) -> Response:
        owner = await access.owner(request)
        return AsciiJSON(as_json(request)(await own_task(request, owner)))

    async def list_tasks(request: Request) -> Response:
        owner = await access.owner(request)
        query = request.query_params
        _only(query, {"status", "limit", "before"})
        limit = _int_param(query.get("limit", "50"), "limit", 1, 200)
        before = query.get("before") or None
        status = query.get("status") or None
        tasks = await manager.list(owner=owner, status=status, limit=limit, before=before)
        render = as_json(request)
        more = len(tasks) == limit
        return AsciiJSON({"tasks": [render(t) for t in tasks], "next_before": tasks[-1].id if more else None})

    async def pending(request: Request) -> Response:
        owner = await access.owner(request)
        render = as_json(request)
        return AsciiJSON({"tasks": [render(t) for t in await manager.pending(owner=owner)]})

    async def cancel(request: Request) -> Response:
        owner = await access.owner(request)
        task = await own_task(request, owner)
        return AsciiJSON(as_json(request)(await manager.cancel(task.id)))

    async def events(request: Request) -> Response:
        owner = await access.owner(request)
        task = await own_task(request, owner)
        return AsciiJSON({"events": [event_json(e) for e in await manager.events(task.id)]})

    async def image(request: Request) -> Response:
        owner = await access.owner(request)
        task = await own_task(request, owner)
        _only(request.query_params, {"w"})
        index = _int_param(request.path_params["index"], "index", 0, 1000)
        return await image_response(request, task, index, thumbs)

    async def reference(request: Request) -> Response:
        owner = await access.owner(request)
        task = await own_task(request, owner)
        _only(request.query_params, {"w"})
        index = _int_param(request.path_params["index"], "index", 0, 1000)
        return await image_response(request, task, index, thumbs, references=True)

    async def credits(request: Request) -> Response:
        owner = await access.owner(request)
        balance = await manager.credits.balance(owner)
        return AsciiJSON({"owner": owner, "balance": balance, "charging": manager.charging})

    async def me(request: Request) -> Response:
        owner = await access.owner(request)
        return AsciiJSON({"owner": owner, "charging": manager.charging, "max_pending": max_pending})

    async def ticket(request: Request) -> Response:
        who = await access.identity(request)
        return AsciiJSON({"ticket": access.ticket_for(who), "expires_in": TICKET_SECONDS})

    async def stream(request: Request) -> Response:
        who = await access.identity(request, ticket=True)
        raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        last_id = None if raw in (None, "") else _int_param(raw, "Last-Event-ID", 0, 2**62)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":  # headers only: a body nobody reads would never end
            return Response(media_type="text/event-stream", headers=headers)
        return StreamingResponse(
            hub.events(who.owner, last_id, as_json(request), lambda: access.still_valid(who)),
            media_type="text/event-stream",
            headers=headers,
        )

    # -- the seed's endpoints, with its field names --

    async def seed_generate(request: Request) -> Response:
        owner = await access.owner(request)
        body = await read_json(request, max_body)
        fields: dict[str, Any] = {}
        sent: dict[str, str] = {}  # our field name -> the name the page used, for errors
        for name, value in body.items():
            if name not in _SEED_FIELDS:
                raise ApiError(422, "invalid", f"unknown field; use {', '.join(sorted(_SEED_FIELDS))}", name)
            fields[_SEED_FIELDS[name]] = value
            sent[_SEED_FIELDS[name]] = name
        try:
            task = await _submit(manager, owner, fields, [], max_pending)
        except Exception as exc:
            error = ApiError.of(exc, retry_after=max(manager.poll_interval, 1.0) * 5)
            error.field = sent.get(error.field or "", error.field)
            raise error from None
        return AsciiJSON({"status": "processing", "taskId": task.id})

    async def seed_polling(request: Request) -> Response:
        owner = await access.owner(request)
        body = await read_json(request, max_body)
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or set(body) != {"taskId"}:
            raise ApiError(422, "invalid", 'send {"taskId": "<the id>"}', "taskId")
        request.path_params["task_id"] = task_id
        task = await own_task(request, owner)
        if not task.done:
            return AsciiJSON({"status": "processing"})
        if task.ok:
            urls = [item["url"] for item in as_json(request)(task)["images"]]
            return AsciiJSON({"status": "completed", "images": urls})
        error = task.error
        reason = {"code": error.code, "message": error.message} if error else {"code": task.status.value}
        return AsciiJSON({"status": "failed", "error": reason})

    async def seed_pending(request: Request) -> Response:
        owner = await access.owner(request)
        found = await manager.pending(owner=owner)
        return AsciiJSON(
            {
                "pendingTasks": [
                    {
                        "task_id": t.id,
                        "prompt": t.prompt,
                        "status": "processing",
                        "created_at": task_json(t)["created_at"],
                        "model": t.model,
                        "n": t.params.get("n", 1),
                    }
                    for t in found
                ]
            }
        )

    # -- the page and the description --

    async def page(request: Request) -> Response:
        # The page keeps its token in the browser: no other site may frame it (clickjacking).
        headers = {"Cache-Control": "no-cache", "Content-Security-Policy": "frame-ancestors 'self'",
                   "X-Frame-Options": "SAMEORIGIN"}  # fmt: skip
        return FileResponse(STATIC / "index.html", headers=headers)

    async def spec(request: Request) -> Response:
        return AsciiJSON(openapi(base(request)))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        opened = False
        if not manager.is_open:
            await manager.open()
            opened = True
        try:
            yield
        finally:
            await hub.close()
            if opened:
                await manager.aclose()

    def guarded(endpoint: Any) -> Any:
        async def run(request: Request) -> Response:
            try:
                return await endpoint(request)  # type: ignore[no-any-return]
            except Exception as exc:
                return error_response(ApiError.of(exc, retry_after=max(manager.poll_interval, 1.0) * 5))

        return run

    routes = [
        Route("/", guarded(page), methods=["GET"]),
        Route("/openapi.json", guarded(spec), methods=["GET"]),
        Route("/api/me", guarded(me), methods=["GET"]),
        Route("/api/tasks", guarded(tasks_route), methods=["GET", "POST"]),
        Route("/api/tasks/batch", guarded(submit_batch), methods=["POST"]),
        Route("/api/tasks/pending", guarded(pending), methods=["GET"]),
        Route("/api/tasks/{task_id:imagetask_id}", guarded(get_task), methods=["GET"]),
        Route("/api/tasks/{task_id:imagetask_id}/cancel", guarded(cancel), methods=["POST"]),
        Route("/api/tasks/{task_id:imagetask_id}/events", guarded(events), methods=["GET"]),
        Route("/api/tasks/{task_id:imagetask_id}/images/{index}", guarded(image), methods=["GET"]),
        Route("/api/tasks/{task_id:imagetask_id}/references/{index}", guarded(reference), methods=["GET"]),
        Route("/api/credits", guarded(credits), methods=["GET"]),
        Route("/api/stream", guarded(stream), methods=["GET"]),
        Route("/api/stream/ticket", guarded(ticket), methods=["POST"]),
        Route("/api/generate-image", guarded(seed_generate), methods=["POST"]),
        Route("/api/generate-image/polling", guarded(seed_polling), methods=["POST"]),
        Route("/api/generate-image/pending", guarded(seed_pending), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        # Routing's own answers (no such path, a wrong method) in the API's JSON error shape.
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error_response(
            ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))
        )

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.imagetask = manager
    return app


def _thumbnail_folder(thumbnails: Path | None, images_root: Path) -> Path:
    """The thumbnail cache: the default folder beside the image folder, or the caller's own,
    which must be outside the image folder (prune never sweeps it, and thumbnails inside the
    task folders would keep them from being deleted with their images)."""
    if thumbnails is None:
        return thumbnail_folder(images_root)
    folder = Path(thumbnails).expanduser().absolute()
    if folder == images_root or images_root in folder.parents:
        raise ConfigError(
            f"thumbnails: {folder} is inside the image folder {images_root}; give a folder outside "
            f"it, or leave thumbnails out for the default ({thumbnail_folder(images_root)})"
        )
    return folder


def _only(query: Mapping[str, str], allowed: set[str]) -> None:
    for name in query:
        if name not in allowed:
            raise ApiError(422, "invalid", f"unknown query parameter; use {', '.join(sorted(allowed))}", name)


_int_param = digits  # the one parser of integer parameters


async def _submit_input(
    request: Request, owner: str, max_body: int, max_upload: int, uploads: Uploads
) -> tuple[dict[str, Any], list[bytes]]:
    """A submit's fields and reference images, from JSON or a multipart form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        body = await read_json(request, max_body)
        for name in body:
            if name not in _SUBMIT_FIELDS:
                raise ApiError(
                    422, "invalid", f"unknown field; use {', '.join(sorted(_SUBMIT_FIELDS))}", name
                )
        return body, []
    async with uploads.slot(owner):
        return await _read_form(request, await uploads.read(request, max_upload))


async def _read_form(request: Request, raw: bytes) -> tuple[dict[str, Any], list[bytes]]:
    # The form is parsed from the body already read (its size checked), not from the socket.
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    parsed = Request(request.scope, replay)
    fields: dict[str, Any] = {}
    images: list[bytes] = []
    try:
        form_context = parsed.form(max_files=16, max_fields=32)
        form = await form_context.__aenter__()
    except Exception as exc:  # Starlette raises several kinds for a bad form
        raise ApiError(400, "invalid_form", f"the multipart body cannot be read: {exc}") from None
    try:
        for name, value in form.multi_items():
            if name == "images":
                if not isinstance(value, UploadFile):
                    raise ApiError(422, "invalid", "must be a file", "images")
                images.append(await value.read())
            elif name not in _SUBMIT_FIELDS:
                raise ApiError(422, "invalid", f"unknown field; use images, {_FIELD_LIST}", name)
            elif isinstance(value, UploadFile):
                raise ApiError(422, "invalid", "must be a text field, not a file", name)
            else:
                fields[name] = value
    finally:
        await form_context.__aexit__(None, None, None)
    if "n" in fields:
        fields["n"] = _int_param(fields["n"], "n", 1, MAX_N)
    if "metadata" in fields:
        import json

        try:
            fields["metadata"] = json.loads(fields["metadata"])
        except (ValueError, RecursionError):
            raise ApiError(422, "invalid", "must be a JSON object", "metadata") from None
    return fields, images


def _checked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A submit's JSON fields with their types checked (the manager checks the values)."""
    for name in fields:
        if name not in _SUBMIT_FIELDS:
            raise ApiError(422, "invalid", f"unknown field; use {_FIELD_LIST}", name)
    if "prompt" not in fields:
        raise ApiError(422, "invalid", "is required", "prompt")
    for name in ("prompt", "model", "aspect_ratio", "size", "idempotency_key"):
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            raise ApiError(422, "invalid", f"must be a string, not {type(value).__name__}", name)
    n = fields.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int):
        raise ApiError(422, "invalid", f"must be an integer, not {type(n).__name__}", "n")
    metadata = fields.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(422, "invalid", "must be a JSON object", "metadata")
    return fields


def _request(owner: str, fields: dict[str, Any], images: list[bytes] | None = None) -> GenerationRequest:
    return GenerationRequest(
        fields["prompt"],
        n=fields.get("n", 1),
        model=fields.get("model"),
        aspect_ratio=fields.get("aspect_ratio"),
        size=fields.get("size"),
        images=tuple(images or ()),
        owner=owner,
        idempotency_key=fields.get("idempotency_key"),
        metadata=fields.get("metadata"),
    )


async def _submit(
    manager: TaskManager, owner: str, fields: dict[str, Any], images: list[bytes], max_pending: int | None
) -> Task:
    request = _request(owner, _checked_fields(fields), images)
    return await manager.submit(
        request.prompt,
        n=request.n,
        model=request.model,
        aspect_ratio=request.aspect_ratio,
        size=request.size,
        images=images,
        owner=owner,
        idempotency_key=request.idempotency_key,
        metadata=request.metadata,
        max_pending=max_pending,
    )
