"""The image store: validated, hashed, atomically written files under one folder.

Layout, all names derived from the task id (never from user input)::

    images/2026/11/27/<task_id>/a<attempt>-<index>.png   generated images
    images/2026/11/27/<task_id>/ref-<index>.png          copies of reference images

A file is written to ``<name>.tmp``, fsynced, renamed into place and its folder fsynced
before the database row that points to it commits, so a row never names a partial file.
A crash in between leaves an orphan that `ImageStore.sweep` finds.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import stat
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from . import _config
from ._exceptions import ValidationError
from ._ids import task_id_ms
from ._models import ImageInput, StoredImage, TaskError
from ._store.rows import provenance_json

if TYPE_CHECKING:
    from PIL import Image

    from .testing import Faults

__all__ = ["ImageStore", "InvalidImage", "inspect", "thumbnail_folder", "thumbnail_path"]

log = logging.getLogger("imagetask")

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_ADDRESS = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_NAME = re.compile(r"^(?:a(?P<attempt>\d+)|ref)-(?P<index>\d+)\.[a-z]+(?P<tmp>\.tmp)?$")


class InvalidImage(ValueError):
    """Bytes that Pillow cannot decode as a PNG, JPEG or WebP image."""


@attrs.frozen
class Inspected:
    mime: str
    width: int
    height: int


def inspect(data: bytes) -> Inspected:
    """Decode ``data`` fully with Pillow and report what it is.

    Raises:
        InvalidImage: if the bytes are not a whole PNG, JPEG or WebP image.
    """
    from PIL import Image

    if not data:
        raise InvalidImage("no bytes")
    try:
        with _opened(data) as im:
            fmt = im.format
            width, height = im.size
            if width * height > _config.MAX_IMAGE_PIXELS:  # read from the header: before decoding
                raise InvalidImage(
                    f"{width}x{height} is more than {_config.MAX_IMAGE_PIXELS // 1_000_000} megapixels"
                )
            im.load()  # decodes every pixel: truncated files fail here, not later
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types for bad input
        # Pillow names the in-memory file by its address ("<_io.BytesIO object at 0x7f...>"):
        # callers name the real source instead.
        reason = _ADDRESS.sub("the data", str(exc))
        raise InvalidImage(f"Pillow cannot decode it ({type(exc).__name__}: {reason})") from None
    mime = Image.MIME.get(fmt or "", "")
    if mime not in _EXT:
        raise InvalidImage(f"format {fmt} is not PNG, JPEG or WebP")
    return Inspected(mime, width, height)


#: What Pillow may open: the stored formats, and those a reference image is converted from.
_READ_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """Pillow's image of ``data`` (header read, pixels not yet decoded). Its own
    decompression-bomb warning is silenced: callers check `MAX_IMAGE_PIXELS` themselves,
    from the header, and refuse with a clear reason."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Only formats with a plain decoder: never EPS or PDF, which Pillow hands to Ghostscript.
        im = Image.open(io.BytesIO(data), formats=_READ_FORMATS)
    with im:
        yield im


def read_reference(item: ImageInput, position: int) -> bytes:
    """Read one reference image given to ``submit`` into PNG, JPEG or WebP bytes.

    Raises:
        ValidationError: naming ``images[position]`` when it is unreadable, not an
            image, or larger than the limit.
    """
    field = f"images[{position}]"
    limit = _config.MAX_REFERENCE_BYTES
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)
    elif isinstance(item, str | os.PathLike):
        data = _read_file(Path(item), field, limit)
    elif _is_pil_image(item):
        buf = io.BytesIO()
        try:
            item.save(buf, format="PNG")
        except Exception as exc:
            raise ValidationError(field, f"cannot encode this PIL image as PNG: {exc}") from None
        data = buf.getvalue()
    else:
        raise ValidationError(field, f"expected a file path, bytes or a PIL image, got {type(item).__name__}")
    if len(data) > limit:
        raise ValidationError(field, f"image is {len(data)} bytes; the limit is {limit} (20 MB)")
    try:
        inspect(data)
    except InvalidImage as exc:
        source = f"{item}" if isinstance(item, str | os.PathLike) else "the bytes given"
        data = _convert_to_png(data, field, InvalidImage(f"{source}: {exc}"))
    return data


#: Open for reading without blocking (a FIFO with no writer would wait forever), without
#: becoming a terminal's controlling process, and without leaking into child processes.
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_CHUNK = 1024 * 1024


def _read_file(path: Path, field: str, limit: int) -> bytes:
    """Read a regular file of at most ``limit`` bytes, whatever its size claims to be.

    Only regular files are read: a FIFO, a device (``/dev/zero``), a socket or a folder is
    refused before it is read. The size reported by ``stat`` is not trusted (``/proc`` files
    say 0): reading stops one chunk past ``limit``, so an endless file cannot exhaust memory.

    Raises:
        ValidationError: naming ``field``, for a missing, unreadable, special or oversized file.
    """
    try:
        # Refuse special files before opening them: opening a device can have side effects.
        _check_regular(path, os.stat(path), field, limit)
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise ValidationError(field, f"cannot read {path}: {_reason(exc)}") from None
    except (ValueError, UnicodeError) as exc:  # a NUL, or a lone surrogate the OS cannot take
        raise ValidationError(field, f"{str(path)!r} is not a usable path ({exc})") from None
    try:
        # Check again on the open file: the path may have been replaced in between.
        _check_regular(path, os.fstat(fd), field, limit)
        chunks: list[bytes] = []
        total = 0
        while total <= limit:
            # Whole chunks (a /proc file may refuse odd sizes): at most limit + 1 MiB in memory.
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise ValidationError(field, f"cannot read {path}: {_reason(exc)}") from None
    finally:
        os.close(fd)
    if total > limit:
        raise ValidationError(field, f"{path} is more than {limit} bytes; the limit is {limit} (20 MB)")
    return b"".join(chunks)


def _check_regular(path: Path, st: os.stat_result, field: str, limit: int) -> None:
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        raise ValidationError(
            field,
            f"{path} is not a regular file (a {_kind(mode)}); pass an image file, bytes or a PIL image",
        )
    if st.st_size > limit:
        raise ValidationError(field, f"{path} is {st.st_size} bytes; the limit is {limit} (20 MB)")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _is_pil_image(item: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    return isinstance(item, Image.Image)


def _convert_to_png(data: bytes, field: str, why: InvalidImage) -> bytes:
    """Turn a decodable image of another format (GIF, BMP, TIFF) into PNG."""

    try:
        with _opened(data) as im:
            if im.width * im.height > _config.MAX_IMAGE_PIXELS:
                raise ValidationError(field, f"not usable: {why}")
            im.load()
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except ValidationError:
        raise
    except Exception:
        raise ValidationError(field, f"not an image: {why}") from None
    return buf.getvalue()


@attrs.define
class ImageStore:
    """Image files of one database, under ``root``."""

    root: Path
    #: Also fsync the folder after each rename, so the new name survives power loss (with
    #: ``durability="full"``; a process crash never loses a completed rename).
    sync_dirs: bool = False
    #: The test hook: faults injected into image writes (see `imagetask.testing`).
    faults: Faults | None = None

    def task_dir(self, task_id: str) -> Path:
        """The folder of one task's files (dated by the task id's timestamp)."""
        return Path(self._task_folder(task_id))

    def _task_folder(self, task_id: str) -> str:
        # Plain strings on the hot path (one image per task): pathlib's parsing costs more
        # than the rest of this function.
        return os.path.join(str(self.root), _day_folder(task_id_ms(task_id) // _DAY_MS), task_id)

    def write_output(
        self, task_id: str, attempt: int, index: int, data: bytes, provenance: Mapping[str, Any] | None = None
    ) -> StoredImage:
        """Validate and durably write one generated image (``provenance``: what the provider
        said about it, kept on the record).

        Raises:
            InvalidImage: when the bytes are not a decodable image; nothing is written.
        """
        return self._write(task_id, f"a{attempt}-{index}", index, data, provenance)

    def write_reference(self, task_id: str, index: int, data: bytes) -> StoredImage:
        """Durably write a copy of one (already validated) reference image."""
        return self._write(task_id, f"ref-{index}", index, data)

    def _write(
        self, task_id: str, stem: str, index: int, data: bytes, provenance: Mapping[str, Any] | None = None
    ) -> StoredImage:
        info = inspect(data)
        folder = self._task_folder(task_id)
        path = os.path.join(folder, f"{stem}.{_EXT[info.mime]}")
        tmp = path + ".tmp"
        try:
            _make_folder(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if self.faults is not None:
                    self.faults.before("write_image")
                    self.faults.before_commit("write_image")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            # A full disk (ENOSPC), a read-only one (EROFS), an I/O error: leave no partial
            # .tmp file behind, and let the caller see the original error.
            _unlink_quietly(tmp)
            raise
        if self.sync_dirs:
            if self.faults is not None:
                self.faults.before("sync_folder")
            _fsync_dir(folder)
        return StoredImage(
            path=Path(path),
            mime=info.mime,
            width=info.width,
            height=info.height,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            index=index,
            # As a read gives it back: waiters get this record without reading the row.
            provenance=json.loads(provenance_json(provenance)) if provenance else {},
        )

    def relative(self, path: Path) -> str:
        """The path as stored in the database: relative to the root, with ``/``."""
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        """The absolute path of a stored relative path."""
        return self.root / relative

    def delete(self, paths: Iterable[Path]) -> int:
        """Delete files (missing ones are fine) and their emptied task folders."""
        count = 0
        folders = set()
        failed: list[str] = []
        for path in paths:
            try:
                path.unlink()
                count += 1
            except FileNotFoundError:
                pass
            except OSError as exc:  # read-only, I/O error: the file stays, an orphan for later
                failed.append(f"{path.name}: {exc.strerror or exc}")
            folders.add(path.parent)
        if failed:
            log.warning(
                "could not delete %d image file(s) under %s (%s%s); the next prune tries again",
                len(failed), self.root, "; ".join(failed[:3]), ", ..." if len(failed) > 3 else "",
            )  # fmt: skip
        for folder in folders:
            self._remove_empty(folder)
        return count

    def _remove_empty(self, folder: Path) -> None:
        # The task folder, then its day, month and year folders, while empty.
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def scan_all(self) -> list[tuple[str, Path, int | None]]:
        """`scan`, listed whole; an unreadable image folder is logged and lists nothing (the
        caller's rows are pruned all the same; the orphans wait for the next sweep)."""
        try:
            return list(self.scan())
        except OSError as exc:
            log.warning("prune: cannot list the image folder %s (%s); orphans not swept", self.root, exc)
            return []

    def scan(self) -> Iterator[tuple[str, Path, int | None]]:
        """Every file in the store, temporary ones included: (task id, path, attempt, or None
        for a reference copy)."""
        if not self.root.is_dir():
            return
        for folder in self.root.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*"):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                m = _NAME.match(path.name)
                if m is None:
                    continue
                attempt = m["attempt"]
                yield folder.name, path, None if attempt is None else int(attempt)

    def sweep(self, known: dict[str, tuple[str, int]], referenced: set[str], files: list[Any]) -> int:
        """Delete orphan files among ``files`` (as listed by `scan` *before* reading the db).

        Args:
            known: task id -> (status, attempt) for every listed task still in the db.
            referenced: relative paths some row points to.
            files: the listing from `scan`.

        Returns:
            How many files were deleted.
        """
        doomed = []
        now = time.time()
        for task_id, path, attempt in files:
            rel = self.relative(path)
            if rel in referenced:
                continue
            state = known.get(task_id)
            if state is None:
                # No row (yet): a submit may be copying references right now.
                try:
                    if now - path.stat().st_mtime < _config.ORPHAN_GRACE:
                        continue
                except FileNotFoundError:
                    continue
            elif state[0] == "running" and attempt == state[1]:
                continue  # the live attempt is writing it
            # Otherwise: a file of a finished task or of an older attempt that no row names
            # (a crash before the commit, a lost claim), or a reference copy a submit left.
            doomed.append(path)
        return self.delete(doomed)

    def sweep_thumbnails(self, folder: Path) -> int:
        """Delete the cached thumbnails (see `thumbnail_path`) in ``folder`` whose image file
        is gone (its task pruned, or an orphan swept), files of the older digest-named layout
        (``ab/<sha256>-w256.webp``), and our temporary files an interrupted write left more
        than an hour ago; then the emptied folders. Other files are left alone; a symlinked
        folder is not followed. Never raises: a cache it cannot sweep is logged and left.
        Returns how many files were deleted."""
        try:
            return self._sweep_thumbnails(folder)
        except Exception as exc:  # a cache, never a reason for prune to fail
            log.warning("the thumbnail cache %s was not swept: %s", folder, exc)
            return 0

    def _sweep_thumbnails(self, folder: Path) -> int:
        count = 0
        stale = time.time() - 3600
        if folder.is_symlink() or not folder.is_dir():
            return 0
        pending, seen = [folder], []
        while pending:  # iterative: a deep tree must not exhaust the stack
            here = pending.pop()
            seen.append(here)
            with contextlib.suppress(OSError), os.scandir(here) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(Path(entry.path))
                        continue
                    name, path = entry.name, Path(entry.path)
                    if _THUMBNAIL_TMP.fullmatch(name):
                        with contextlib.suppress(OSError):
                            if path.lstat().st_mtime < stale:
                                path.unlink()
                                count += 1
                        continue
                    thumb = _THUMBNAIL.fullmatch(name)
                    if thumb is not None:
                        if (self.root / here.relative_to(folder) / thumb["image"]).is_file():
                            continue
                    elif _OLD_THUMBNAIL.fullmatch(name) is None:
                        continue
                    with contextlib.suppress(OSError):
                        path.unlink()
                        count += 1
        for here in reversed(seen[1:]):
            with contextlib.suppress(OSError):
                here.rmdir()  # only once empty
        return count


def thumbnail_folder(images_root: Path) -> Path:
    """Where the web app caches thumbnails unless told otherwise: beside the image folder
    (``images-thumbnails``); `TaskManager.prune` sweeps it."""
    return images_root.with_name(images_root.name + "-thumbnails")


def thumbnail_path(folder: Path, images_root: Path, image: Path, width: int) -> Path:
    """Where ``image``'s thumbnail ``width`` pixels wide is cached in ``folder``: at the
    image's own place below ``images_root``, its name followed by the width
    (``2026/12/01/<id>/a1-0.png.w256.webp``), so a task's thumbnails go with its images."""
    rel = image.relative_to(images_root)
    return folder / rel.parent / f"{rel.name}.w{width}.webp"


#: A cached thumbnail's name (see `thumbnail_path`).
_THUMBNAIL = re.compile(r"(?P<image>.+\.(?:png|jpg|webp))\.w[0-9]+\.webp")
#: The temporary file a thumbnail is written to before its rename (``tempfile.mkstemp``).
_THUMBNAIL_TMP = re.compile(r"\..+\.w[0-9]+\.webp\..+\.tmp")
#: A thumbnail of the older layout, named by its image's digest.
_OLD_THUMBNAIL = re.compile(r"[0-9a-f]{64}-w[0-9]+\.webp")


def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # already gone (mkdir or open failed), or the file system refuses (read-only)


_DAY_MS = 86_400_000


@functools.lru_cache(maxsize=16)
def _day_folder(day: int) -> str:
    """``YYYY/MM/DD`` of a day number (days since the epoch, UTC)."""
    return datetime.fromtimestamp(day * 86_400, tz=UTC).strftime("%Y/%m/%d").replace("/", os.sep)


def _make_folder(folder: str) -> None:
    """Create a task's folder and its missing parents (the day's folders exist but once a day)."""
    try:
        os.mkdir(folder)
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise


def _fsync_dir(folder: Path | str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, root: object, timeout: float) -> TaskError:
    """The task error for images that could not be stored, naming the reason (``ENOSPC``...)."""
    name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
    reason = exc.strerror or str(exc)
    return TaskError(
        "storage_error",
        f"the images could not be stored in {root} ({name + ': ' if name else ''}{reason}), "
        f"still after {timeout:g} s of trying; free space or fix the folder, then submit again",
        retryable=False,
    )
