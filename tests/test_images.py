"""The image store: validation with Pillow, atomic writes, orphan sweeping."""

from __future__ import annotations

import io
import os
import time

import pytest
from PIL import Image

from imagetask._images import ImageStore, InvalidImage, inspect
from imagetask._models import new_task_id


def encoded(fmt: str, size=(16, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "orange").save(buf, format=fmt)
    return buf.getvalue()


def noisy_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_inspect_reads_format_and_size_from_the_bytes(fmt, mime):
    """inspect() reports the real MIME type and dimensions."""
    info = inspect(encoded(fmt))
    assert (info.mime, info.width, info.height) == (mime, 16, 9)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", noisy_png()[:6000], encoded("GIF")],
    ids=["empty", "text", "truncated-png", "gif"],
)
def test_inspect_refuses_what_is_not_a_whole_png_jpeg_or_webp(data):
    """Empty, non-image, truncated and unsupported-format bytes raise InvalidImage."""
    with pytest.raises(InvalidImage):
        inspect(data)


def test_write_is_atomic_and_named_from_the_task(tmp_path):
    """A written image sits under its task's dated folder, with no temporary file left."""
    store = ImageStore(tmp_path)
    task_id = new_task_id()
    image = store.write_output(task_id, 2, 1, encoded("PNG"))
    assert image.path.name == "a2-1.png" and image.path.parent.name == task_id
    assert image.path.read_bytes() == encoded("PNG")
    assert list(tmp_path.rglob("*.tmp")) == []


def test_invalid_bytes_write_nothing(tmp_path):
    """Writing bytes that are not an image raises and creates no file."""
    store = ImageStore(tmp_path)
    with pytest.raises(InvalidImage):
        store.write_output(new_task_id(), 1, 0, b"junk")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_sweep_keeps_live_and_referenced_files_and_deletes_orphans(tmp_path):
    """sweep deletes unreferenced files of finished tasks and old attempts, keeps the running
    attempt's files, referenced files, and recent files of tasks not yet committed."""
    store = ImageStore(tmp_path)
    png = encoded("PNG")
    done, running, unknown, old_unknown = (new_task_id() for _ in range(4))
    kept = store.write_output(done, 2, 0, png)
    stale = store.write_output(done, 1, 0, png)
    live = store.write_output(running, 3, 0, png)
    older = store.write_output(running, 2, 0, png)
    fresh = store.write_reference(unknown, 0, png)
    aged = store.write_reference(old_unknown, 0, png)
    past = time.time() - 7200
    os.utime(aged.path, (past, past))
    listing = list(store.scan())
    known = {done: ("succeeded", 2), running: ("running", 3)}
    referenced = {store.relative(kept.path)}
    assert store.sweep(known, referenced, listing) == 3
    assert kept.path.exists() and live.path.exists() and fresh.path.exists()
    assert not stale.path.exists() and not older.path.exists() and not aged.path.exists()
    assert not aged.path.parent.exists()  # emptied task folders go too
