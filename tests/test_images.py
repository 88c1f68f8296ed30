"""The image store: validation with Pillow, atomic writes, orphan sweeping."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from imagetask import TaskManager, ValidationError
from imagetask._ids import new_task_id
from imagetask._images import ImageStore, InvalidImage, inspect, read_reference
from imagetask.providers import FakeProvider
from imagetask.testing import Faults


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


# Reference images given as paths: only regular files, read with a hard size cap.


@pytest.fixture
def memory_cap() -> Iterator[None]:
    """Cap the address space at 1 GiB more than now, so a read without limit (the bug these
    tests guard against) fails with MemoryError instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    cap = vm + 2**30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def release_fifo_readers(fifo: Path) -> None:
    """Wake a thread stuck opening ``fifo`` for reading (it then reads EOF), so a failing
    test does not leave the event loop's executor hung on it."""
    for _ in range(3):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return  # ENXIO: no reader waiting


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_endless_device_path_is_refused_not_read(memory_cap):
    """A device path such as /dev/zero (size 0, endless data) is refused with a
    ValidationError naming images[0], not read into memory."""
    with pytest.raises(ValidationError, match="not a regular file") as info:
        read_reference("/dev/zero", 0)
    assert info.value.field == "images[0]"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
async def test_submit_refuses_an_endless_device_and_writes_nothing(tmp_path, memory_cap):
    """submit(images=["/dev/zero"]) raises a ValidationError naming images[0] and stores no task."""
    async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
        async with asyncio.timeout(10):
            with pytest.raises(ValidationError, match="not a regular file") as info:
                await tm.submit("x", images=["/dev/zero"])
        assert info.value.field == "images[0]"
        assert await tm.list() == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
async def test_fifo_path_is_refused_at_once_not_waited_on(tmp_path):
    """A FIFO path is refused at once with a ValidationError naming images[i], directly
    and through submit, instead of waiting for a writer that never comes."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(ValidationError, match="not a regular file") as info:
                await asyncio.to_thread(read_reference, fifo, 2)
        assert info.value.field == "images[2]" and "FIFO" in str(info.value)
        async with TaskManager(tmp_path / "t.db", provider=FakeProvider(), workers=False) as tm:
            async with asyncio.timeout(5):
                with pytest.raises(ValidationError, match="not a regular file") as info:
                    await tm.submit("x", images=[encoded("PNG"), str(fifo)])
            assert info.value.field == "images[1]"
            assert await tm.list() == []
    finally:
        release_fifo_readers(fifo)


def test_folder_path_is_refused(tmp_path):
    """A folder given as an image is refused with a ValidationError naming images[0]."""
    with pytest.raises(ValidationError, match="not a regular file") as info:
        read_reference(tmp_path, 0)
    assert info.value.field == "images[0]" and "folder" in str(info.value)


def test_missing_path_is_refused(tmp_path):
    """A path that does not exist is refused with a ValidationError naming images[0] and the reason."""
    with pytest.raises(ValidationError, match="No such file") as info:
        read_reference(tmp_path / "nope.png", 0)
    assert info.value.field == "images[0]"


def _pagemap_readable() -> bool:
    try:
        with open("/proc/self/pagemap", "rb") as f:
            return len(f.read(8)) == 8
    except OSError:
        return False


@pytest.mark.skipif(not _pagemap_readable(), reason="needs a readable /proc/self/pagemap")
def test_a_regular_file_claiming_size_zero_is_read_only_up_to_the_cap(memory_cap):
    """A regular file whose stat size is 0 but which yields endless data (/proc/self/pagemap,
    hundreds of GiB) is refused after reading just past the 20 MB limit, not read to the end."""
    assert os.stat("/proc/self/pagemap").st_size == 0  # the size that must not be trusted
    with pytest.raises(ValidationError, match=r"more than 20971520 bytes; the limit is 20971520") as info:
        read_reference("/proc/self/pagemap", 0)
    assert info.value.field == "images[0]"


def test_a_regular_image_file_is_still_read(tmp_path):
    """A regular PNG file path is read back byte for byte."""
    path = tmp_path / "ref.png"
    path.write_bytes(noisy_png())
    assert read_reference(path, 0) == path.read_bytes()


# Writes that fail half way leave no temporary file.


def big_noisy_png() -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_full_disk_raises_enospc_and_leaves_no_tmp_file(tmpfs):
    """A write that runs out of space raises the OSError (ENOSPC) unchanged and leaves no .tmp file."""
    store = ImageStore(tmpfs.path / "images")
    store.root.mkdir()
    tmpfs.fill(leave_bytes=16 * 1024)
    data = big_noisy_png()
    assert len(data) > tmpfs.free()
    with pytest.raises(OSError, match="No space left") as info:
        store.write_output(new_task_id(), 1, 0, data)
    assert info.value.errno == errno.ENOSPC
    assert list(tmpfs.path.rglob("*.tmp")) == []
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_read_only_disk_raises_erofs_and_leaves_nothing(tmpfs):
    """A write to a read-only file system raises the OSError (EROFS) unchanged and leaves no file."""
    store = ImageStore(tmpfs.path / "images")
    store.root.mkdir()
    tmpfs.remount(ro=True)
    with pytest.raises(OSError, match="Read-only file system") as info:
        store.write_output(new_task_id(), 1, 0, encoded("PNG"))
    assert info.value.errno == errno.EROFS
    assert [p for p in tmpfs.path.rglob("*") if p.is_file()] == []
    tmpfs.remount(ro=False)
    assert store.write_output(new_task_id(), 1, 0, encoded("PNG")).path.exists()


def test_an_io_error_while_writing_leaves_no_tmp_file(tmp_path):
    """An I/O error (EIO, injected with the documented fault hook) while an image is written
    propagates unchanged and removes the .tmp file; the next write goes through."""
    failure = OSError(errno.EIO, "Input/output error")
    faults = Faults()
    faults.fail("write_image", failure)
    store = ImageStore(tmp_path, faults=faults)
    with pytest.raises(OSError, match="Input/output error") as info:
        store.write_output(new_task_id(), 1, 0, encoded("PNG"))
    assert info.value is failure
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert store.write_output(new_task_id(), 1, 0, encoded("PNG")).path.exists()
    assert faults.hits["write_image"] == 2


async def test_an_image_is_visible_under_its_name_only_once_whole(tmp_path):
    """While a generated image is being written, only its temporary file exists; its own
    name appears only after the whole file was written (by a rename), and no .tmp remains."""
    seen: list[list[str]] = []
    images = tmp_path / "images"

    def look() -> None:  # runs while the temporary file is open, before the bytes are written
        seen.append(sorted(p.name for p in images.rglob("*") if p.is_file()))

    faults = Faults()
    faults.call("write_image", look, times=2)
    async with TaskManager(tmp_path / "tasks.db", provider=FakeProvider(), faults=faults) as tm:
        done = await tm.wait((await tm.submit("written whole", n=2)).id, timeout=10)
    assert done.ok
    assert seen == [["a1-0.png.tmp"], ["a1-0.png", "a1-1.png.tmp"]]
    assert sorted(p.name for p in images.rglob("*") if p.is_file()) == ["a1-0.png", "a1-1.png"]
    assert [im.path.read_bytes()[:8] for im in done.images] == [b"\x89PNG\r\n\x1a\n"] * 2


STRACE = shutil.which("strace")


@pytest.mark.skipif(STRACE is None, reason="needs strace (apt-get install strace)")
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_each_image_is_fsynced_before_its_rename(tmp_path, durability):
    """Traced for real with strace in a child process: each image's temporary file is fsynced
    before it is renamed to its own name; with durability="full" its folder is fsynced after
    the rename, so the new name survives a power loss too."""
    script = textwrap.dedent(f"""
        import asyncio
        from imagetask import TaskManager
        from imagetask.providers import FakeProvider

        async def main():
            async with TaskManager({str(tmp_path / "tasks.db")!r}, provider=FakeProvider(),
                                   durability={durability!r}) as tm:
                task = await tm.submit("traced", n=2)
                assert (await tm.wait(task.id, timeout=30)).ok

        asyncio.run(main())
    """)
    trace = tmp_path / "trace"
    calls = "trace=fsync,fdatasync,rename,renameat,renameat2"
    command = [STRACE, "-f", "-y", "-qq", "-e", calls, "-o", str(trace), sys.executable, "-c", script]
    subprocess.run(command, check=True, timeout=60, capture_output=True)
    lines = trace.read_text().splitlines()

    def first(pattern: str) -> int:
        found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert found, f"no line matches {pattern!r} in:\n" + "\n".join(lines[-40:])
        return found[0]

    for name in ("a1-0.png", "a1-1.png"):
        synced = first(rf"f(data)?sync\(\d+<[^>]*/{name}\.tmp>\)")
        renamed = first(rf"rename(at2?)?\(.*{name}\.tmp\", .*{name}\"")
        assert synced < renamed
        if durability == "full":
            named = re.search(r"\"([^\"]*)/" + re.escape(name) + '"', lines[renamed])
            assert named is not None
            folder = named.group(1)
            assert any(re.search(rf"fsync\(\d+<{re.escape(folder)}>\)", line) for line in lines[renamed:])
