"""Contact sheets: each case's source beside its result, small thumbnails, the result framed
green when tools/artifacts.py judges it clean and red when not, so that a reader sees at a
glance what the `clean` rate counts. PIL only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GREEN, RED, GREY, PAPER = (30, 170, 60), (210, 30, 30), (150, 150, 150), (255, 255, 255)


def to_pil(image) -> Image.Image | None:
    """PIL image, (3, H, W) array or tensor in [0, 1], or None (a failed case) -> PIL or None."""
    if image is None or isinstance(image, Image.Image):
        return image
    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    return Image.fromarray((a.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8))


def contact_sheet(pairs, path, thumb: int = 64, columns: int = 4, frame: int = 3) -> Path:
    """pairs: [(source or None, result or None, clean)] -> a PNG at `path`: `columns` pairs a
    row, each pair the source (grey frame) and the result (green: clean, red: not); a missing
    picture is a crossed-out blank. Longer tuples (a, b, …, result, clean) frame all but the
    last picture grey."""
    cell, gap = thumb + 2 * frame, 4
    n = max((len(p) - 1 for p in pairs), default=2)
    pair_w = n * cell + (n - 1) * gap
    rows = max(1, -(-len(pairs) // columns))
    sheet = Image.new("RGB", (columns * pair_w + (columns + 1) * 2 * gap,
                              rows * cell + (rows + 1) * gap), PAPER)
    draw = ImageDraw.Draw(sheet)
    for k, (*pics, clean) in enumerate(pairs):
        x = 2 * gap + (k % columns) * (pair_w + 2 * gap)
        y = gap + (k // columns) * (cell + gap)
        frames = [GREY] * (len(pics) - 1) + [GREEN if clean else RED]
        for j, (im, colour) in enumerate(zip(pics, frames)):
            x0 = x + j * (cell + gap)
            draw.rectangle([x0, y, x0 + cell - 1, y + cell - 1], fill=colour)
            im = to_pil(im)
            if im is None:
                draw.rectangle([x0 + frame, y + frame, x0 + cell - frame - 1,
                                y + cell - frame - 1], fill=PAPER)
                draw.line([x0 + frame, y + frame, x0 + cell - frame, y + cell - frame], fill=RED)
            else:
                sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BILINEAR),
                            (x0 + frame, y + frame))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path
