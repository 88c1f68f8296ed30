"""How tasks look in a notebook: image cards with inline thumbnails, animated skeleton cards
for pending tasks, error cards, and the live gallery that turns one into the other."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import html
import io
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigError

if TYPE_CHECKING:
    from ._models import StoredImage, Task

__all__ = ["card", "grid", "start_gallery", "thumbnail_uri"]

log = logging.getLogger("imagetask")

#: Longest side of an inline preview, in pixels: a grid of 4K images stays a few hundred KB.
THUMB_PIXELS = 256

_STYLE = """<style>
.imagetask-grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;
  font-family:system-ui,sans-serif;font-size:12px}
.imagetask-card{border:1px solid #ddd;border-radius:8px;overflow:hidden;background:#fff;color:#222}
.imagetask-card img{width:100%;display:block;aspect-ratio:1/1;object-fit:cover;background:#eee}
.imagetask-card .it-meta{padding:6px 8px}
.imagetask-card .it-status{font-weight:600}
.imagetask-card.it-failed{border-color:#d66}
.imagetask-card.it-failed .it-status{color:#b33}
.imagetask-skeleton{aspect-ratio:1/1;background:linear-gradient(90deg,#eee 25%,#f8f8f8 50%,#eee 75%);
  background-size:200% 100%;animation:imagetask-shimmer 1.2s infinite linear}
@keyframes imagetask-shimmer{from{background-position:200% 0}to{background-position:-200% 0}}
</style>"""


@functools.lru_cache(maxsize=512)
def _thumbnail(path: Path, sha256: str) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_uri(image: StoredImage) -> str | None:
    """A downscaled JPEG preview of a stored image as a data URI (cached by content hash), or
    None when the file cannot be read."""
    try:
        return _thumbnail(image.path, image.sha256)
    except OSError:
        return None


def card(task: Task) -> str:
    """One task as an HTML card: its images, a skeleton while pending, or its error."""
    prompt = html.escape(task.prompt[:120])
    status = html.escape(task.status.value)
    meta = (
        f'<div class="it-meta"><span class="it-status">{status}</span> &middot; '
        f"{html.escape(task.model)} &middot; <code>{html.escape(task.id[-8:])}</code><br>{prompt}"
    )
    if task.error is not None:
        meta += f"<br><code>{html.escape(task.error.code)}</code> {html.escape(task.error.message[:300])}"
    meta += "</div>"
    if task.ok:
        pictures = []
        for image in task.images:
            uri = thumbnail_uri(image)
            if uri is None:
                pictures.append('<div class="imagetask-skeleton" title="image file missing"></div>')
            else:
                pictures.append(f'<img src="{uri}" alt="{prompt}" title="{html.escape(str(image.path))}">')
        body = "".join(pictures)
        css = "imagetask-card it-done"
    elif task.done:
        body = ""
        css = "imagetask-card it-failed"
    else:
        body = '<div class="imagetask-skeleton"></div>'
        css = "imagetask-card it-pending"
    return f'<div class="{css}" data-task="{html.escape(task.id)}">{body}{meta}</div>'


def grid(tasks: Sequence[Task]) -> str:
    """Tasks as a grid of cards (the gallery, and a list of tasks in a notebook)."""
    if not tasks:
        return _STYLE + '<div class="imagetask-grid"><em>no tasks</em></div>'
    return _STYLE + '<div class="imagetask-grid">' + "".join(card(t) for t in tasks) + "</div>"


def _ipython_display() -> tuple[Any, Any]:
    """IPython's ``display`` and ``HTML``, or a clear error outside a notebook."""
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        raise ConfigError(
            "gallery() needs IPython: install imagetask[notebook] and run it in Jupyter; in a "
            "script, use tm.list(...) or the `imagetask sheet` command"
        ) from None
    if get_ipython() is None:
        raise ConfigError(
            "gallery() shows a live grid in a Jupyter notebook; outside one, use tm.list(...) "
            "or the `imagetask sheet` command for a picture of the latest images"
        )
    return display, HTML


def start_gallery(
    load: Callable[[], Awaitable[list[Task]]],
    first: list[Task] | None,
    loop: asyncio.AbstractEventLoop,
    running: set[concurrent.futures.Future[None]],
    interval: float = 0.5,
) -> None:
    """Display ``first`` as a grid (or a placeholder, when it must be read on the loop), then,
    while any of its tasks is pending, re-read them with ``load`` every ``interval`` seconds
    and update the same output in place (the cell that made it may have finished long
    before). The refresh runs on the manager's event loop ``loop``, kept in ``running``
    (the manager cancels those when it closes)."""
    display, html_type = _ipython_display()
    placeholder = _STYLE + '<div class="imagetask-grid"><em>loading tasks...</em></div>'
    handle = display(html_type(grid(first) if first is not None else placeholder), display_id=True)

    async def refresh() -> None:
        shown = first
        try:
            while shown is None or any(not t.done for t in shown):
                if shown is not None:
                    await asyncio.sleep(interval)
                current = await load()
                if current != shown:
                    handle.update(html_type(grid(current)))
                    shown = current
        except asyncio.CancelledError:
            raise
        except Exception:  # the manager closed, the kernel is going away: stop quietly
            log.debug("gallery refresh stopped", exc_info=True)

    task = asyncio.run_coroutine_threadsafe(refresh(), loop)
    running.add(task)
    task.add_done_callback(running.discard)
