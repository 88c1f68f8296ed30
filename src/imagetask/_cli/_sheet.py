"""The contact sheet: a labelled grid of the latest images, drawn with Pillow."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from .. import Task

__all__ = ["write_sheet"]

_CELL = 256  # each thumbnail fits in a 256 x 256 square
_LABEL = 34  # two lines of text under it
_PAD = 8


def write_sheet(tasks: Sequence[Task], out: Path, columns: int = 4) -> int:
    """Draw every image of ``tasks`` (newest first) into one PNG grid at ``out``, each
    labelled with its task id and prompt. Returns how many images it holds.

    Raises:
        OSError: ``out`` cannot be written.
    """
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    images = [(task, im) for task in tasks for im in task.images]
    count = max(1, len(images))
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    width = columns * (_CELL + _PAD) + _PAD
    height = rows * (_CELL + _LABEL + _PAD) + _PAD
    sheet = Image.new("RGB", (width, height), (32, 32, 36))
    pen = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if not images:
        pen.text((_PAD, _PAD), "no images yet", fill=(220, 220, 220), font=font)
    for i, (task, stored) in enumerate(images):
        x = _PAD + (i % columns) * (_CELL + _PAD)
        y = _PAD + (i // columns) * (_CELL + _LABEL + _PAD)
        try:
            with Image.open(stored.path) as picture:
                thumb = ImageOps.contain(picture.convert("RGB"), (_CELL, _CELL))  # up or down
        except OSError:  # the file was removed or damaged since: say so in its cell
            pen.rectangle((x, y, x + _CELL, y + _CELL), outline=(200, 80, 80))
            pen.text((x + 4, y + 4), "image missing", fill=(200, 80, 80), font=font)
        else:
            sheet.paste(thumb, (x + (_CELL - thumb.width) // 2, y + (_CELL - thumb.height) // 2))
        lines = textwrap.wrap(f"{task.id[-8:]} #{stored.index}  {task.prompt}", width=40)[:2]
        for row, (text, shade) in enumerate(zip(lines, ((230, 230, 230), (170, 170, 170)), strict=False)):
            pen.text((x, y + _CELL + 4 + 14 * row), text, fill=shade, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return len(images)
