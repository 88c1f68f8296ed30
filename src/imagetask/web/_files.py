"""Image files by task id and index (never by a path from the request), and downscaled
thumbnails cached on disk beside them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from .. import Task
from .._images import thumbnail_path
from ._errors import ApiError

__all__ = ["MAX_THUMB_WIDTH", "MIN_THUMB_WIDTH", "Thumbnails", "image_response"]

MIN_THUMB_WIDTH = 16
MAX_THUMB_WIDTH = 2048
#: Stored images never change (a new attempt writes new files): cache them for a year.
_CACHE = "private, max-age=31536000, immutable"


class Thumbnails:
    """Downscaled WebP copies, cached on disk in ``folder`` at their image's place below
    ``images_root`` (so `TaskManager.prune` deletes a task's thumbnails with its images) and
    at one of a few widths (a request's ``w`` is rounded up to the next of `WIDTHS`, at most
    the image's own width), so the cache holds at most a handful per image. Each is made
    once: a second request for the same one waits for the first; at most two are made at a
    time."""

    #: The widths thumbnails are made at.
    WIDTHS = (64, 128, 256, 512, 1024, 2048)

    def __init__(self, folder: Path, images_root: Path) -> None:
        self.folder = folder
        self.images_root = images_root
        self._making: dict[str, asyncio.Lock] = {}
        self._gate = asyncio.Semaphore(2)

    def width_for(self, asked: int, image_width: int) -> int:
        step = next((w for w in self.WIDTHS if w >= asked), self.WIDTHS[-1])
        return min(step, image_width)

    async def get(self, source: Path, width: int) -> Path:
        target = thumbnail_path(self.folder, self.images_root, source, width)
        if target.is_file():
            return target
        lock = self._making.setdefault(str(target), asyncio.Lock())
        try:
            async with lock:
                if not target.is_file():
                    async with self._gate:
                        await asyncio.to_thread(_make_thumbnail, source, target, width)
        finally:
            if not lock.locked():
                self._making.pop(str(target), None)
        return target


async def image_response(
    request: Request, task: Task, index: int, thumbs: Thumbnails, *, references: bool = False
) -> Response:
    """The task's image ``index`` (or reference image, with ``references``; ``?w=N``: a WebP
    about N pixels wide), with a strong ETag."""
    images = task.references if references else task.images
    if not 0 <= index < len(images):
        kind = "reference image" if references else "image"
        raise ApiError(404, "not_found", f"task {task.id} has no {kind} {index}")
    image = images[index]
    asked = _width(request.query_params.get("w"))
    width = None if asked is None else thumbs.width_for(asked, image.width)
    etag = f'"{image.sha256}"' if width is None else f'"{image.sha256}-w{width}"'
    headers = {"ETag": etag, "Cache-Control": _CACHE, "X-Content-Type-Options": "nosniff"}
    if etag in _etags(request.headers.get("if-none-match", "")):
        return Response(status_code=304, headers=headers)
    if not image.path.is_file():
        raise ApiError(410, "gone", f"the file of image {index} of task {task.id} is missing")
    if width is None:
        return FileResponse(image.path, media_type=image.mime, headers=headers)
    return FileResponse(await thumbs.get(image.path, width), media_type="image/webp", headers=headers)


def _width(value: str | None) -> int | None:
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 5):
        value = "0"
    if not MIN_THUMB_WIDTH <= int(value) <= MAX_THUMB_WIDTH:
        raise ApiError(
            422, "invalid", f"must be a width from {MIN_THUMB_WIDTH} to {MAX_THUMB_WIDTH} pixels", "w"
        )
    return int(value)


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def _make_thumbnail(source: Path, target: Path, width: int) -> None:
    """Write a WebP of ``source`` ``width`` wide, atomically under a name of its own (another
    process may be writing the same one: the last rename wins, both whole)."""
    from PIL import Image

    with Image.open(source) as opened:
        opened.thumbnail((width, width * 4))
        im: Image.Image = opened
        if im.mode not in ("RGB", "RGBA"):  # 16-bit, palette, CMYK...: WebP takes RGB(A)
            im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
        # The folder is made right before the file: a prune sweeping meanwhile removes empty
        # folders (and once more if it raced between the two).
        for tries in (1, 2):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
                break
            except FileNotFoundError:
                if tries == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as out:
                im.save(out, format="WEBP", quality=80)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
