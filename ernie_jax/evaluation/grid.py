"""Sample grids: a batch of images (and their captions) as one picture, for eyes, not for metrics."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_GAP = 4  # pixels between tiles
_FILL = (16, 16, 16)
_INK = (230, 230, 230)


def _to_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"image_grid: expected images [N, H, W, 3] with N >= 1, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"image_grid: images must be uint8 or float in [0, 1], got {images.dtype}")
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _wrap(text: str, font, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a single long word may overflow)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def image_grid(images, captions: list[str] | None = None, *, columns: int | None = None,
               scale: int = 1) -> np.ndarray:
    """Tiles of `images` (uint8 or float in [0, 1], `[N, H, W, 3]`) in rows of `columns` (default about
    sqrt(N)), each enlarged `scale` times (nearest neighbour) and, with `captions`, its caption wrapped
    under it. Returns uint8 `[rows * (tile + text + gap) + gap, columns * (W * scale + gap) + gap, 3]`."""
    images = _to_uint8(images)
    count, height, width, _ = images.shape
    if captions is not None and len(captions) != count:
        raise ValueError(f"image_grid: {len(captions)} captions for {count} images")
    if scale < 1:
        raise ValueError(f"image_grid: scale must be >= 1, got {scale}")
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    tile_h, tile_w = height * scale, width * scale
    font = ImageFont.load_default()
    wrapped = [_wrap(c, font, tile_w) for c in captions] if captions is not None else None
    line_h = font.getbbox("Ag")[3] + 2
    text_h = max(len(lines) for lines in wrapped) * line_h if wrapped else 0
    cell_h, cell_w = tile_h + text_h + _GAP, tile_w + _GAP
    canvas = Image.new("RGB", (columns * cell_w + _GAP, rows * cell_h + _GAP), _FILL)
    draw = ImageDraw.Draw(canvas)
    for i, image in enumerate(images):
        top, left = _GAP + (i // columns) * cell_h, _GAP + (i % columns) * cell_w
        canvas.paste(Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST), (left, top))
        for k, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((left, top + tile_h + k * line_h), line, fill=_INK, font=font)
    return np.asarray(canvas)


def save_grid(path: str | os.PathLike, images, captions: list[str] | None = None, **kwargs) -> None:
    """Write `image_grid(images, captions, **kwargs)` as a PNG at `path` (atomically: whole or absent)."""
    grid = image_grid(images, captions, **kwargs)
    folder = os.path.dirname(os.path.abspath(path))
    handle, temp = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(handle)
    try:
        Image.fromarray(grid).save(temp, format="PNG")
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
