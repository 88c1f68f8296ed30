"""Image files by task id and index (never by a path from the request), and downscaled
thumbnails cached on disk under the image's digest."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from .. import Task
from ._errors import ApiError

__all__ = ["MAX_THUMB_WIDTH", "MIN_THUMB_WIDTH", "image_response"]

MIN_THUMB_WIDTH = 16
MAX_THUMB_WIDTH = 2048
#: Stored images never change (a new attempt writes new files): cache them for a year.
_CACHE = "private, max-age=31536000, immutable"


async def image_response(
    request: Request, task: Task, index: int, thumbs: Path, *, references: bool = False
) -> Response:
    """The task's image ``index`` (or reference image, with ``references``; ``?w=N``: a WebP
    at most N pixels wide), with a strong ETag."""
    images = task.references if references else task.images
    if not 0 <= index < len(images):
        raise ApiError(
            404, "not_found", f"task {task.id} has no {'reference ' if references else ''}image {index}"
        )
    image = images[index]
    width = _width(request.query_params.get("w"))
    etag = f'"{image.sha256}"' if width is None else f'"{image.sha256}-w{width}"'
    headers = {"ETag": etag, "Cache-Control": _CACHE}
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    if width is None:
        if not image.path.is_file():
            raise ApiError(410, "gone", f"the file of image {index} of task {task.id} is missing")
        return FileResponse(image.path, media_type=image.mime, headers=headers)
    cached = thumbs / image.sha256[:2] / f"{image.sha256}-w{width}.webp"
    if not cached.is_file():
        if not image.path.is_file():
            raise ApiError(410, "gone", f"the file of image {index} of task {task.id} is missing")
        await asyncio.to_thread(_make_thumbnail, image.path, cached, width)
    return FileResponse(cached, media_type="image/webp", headers=headers)


def _width(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or not MIN_THUMB_WIDTH <= int(value) <= MAX_THUMB_WIDTH:
        raise ApiError(
            422, "invalid", f"must be a width from {MIN_THUMB_WIDTH} to {MAX_THUMB_WIDTH} pixels", "w"
        )
    return int(value)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _make_thumbnail(source: Path, target: Path, width: int) -> None:
    """Write a WebP of ``source`` at most ``width`` wide, atomically (a reader never sees half)."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as im:
        im.thumbnail((width, width * 4))
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        im.save(tmp, format="WEBP", quality=80)
    os.replace(tmp, target)
