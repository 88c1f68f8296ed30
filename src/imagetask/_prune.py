"""Pruning: old tasks' rows, their image files, orphan files and cached thumbnails."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ._images import ImageStore, thumbnail_folder
from ._records import PruneReport
from ._store import TaskStore

log = logging.getLogger("imagetask")


async def prune(store: TaskStore, images: ImageStore, images_root: Path, before_ms: int) -> PruneReport:
    """Delete the tasks that finished before ``before_ms`` and their files, then sweep the
    image folder for files no row points to and the thumbnails of images no longer kept.

    The rows go first: a crash after them leaves only orphan files, which the next sweep
    deletes; the sweep asks the store only about the ids it found on disk.
    """
    count, paths = await store.prune(before_ms)
    files = await asyncio.to_thread(images.delete, [images.absolute(p) for p in paths])
    listing = await asyncio.to_thread(images.scan_all)
    known, referenced = await store.file_state(sorted({entry[0] for entry in listing}))
    orphans = await asyncio.to_thread(images.sweep, known, referenced, listing)
    thumbs = await asyncio.to_thread(images.sweep_thumbnails, thumbnail_folder(images_root))
    log.info("pruned %d task(s), %d file(s), %d orphan(s), %d thumbnail(s)", count, files, orphans, thumbs)
    return PruneReport(tasks=count, files=files, orphans=orphans, thumbnails=thumbs)
