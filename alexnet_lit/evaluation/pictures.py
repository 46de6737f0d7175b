"""Pictures: the confusion matrix, captioned image grids, network inputs as pixels, and the one
way a matplotlib figure is made and saved. Plain numpy, PIL and matplotlib; no Lightning.
"""

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from alexnet_lit.evaluation.class_report import ratio
from alexnet_lit.runs import printable

# Colour of a row-normalized cell: white (0) to dark blue (1), matplotlib's "Blues" end points.
_LOW = np.array([247, 251, 255], dtype=np.float64)
_HIGH = np.array([8, 48, 107], dtype=np.float64)
_LABEL_CHARS = 16  # class names are cut to this many characters in pictures
# zlib's fastest level: the mistakes grid encodes ~6x faster than at PIL's default (6), for a
# file ~15% larger. Pictures are drawn while training waits.
PNG_COMPRESS_LEVEL = 1


def png_bytes(picture: Image.Image) -> bytes:
    """``picture`` as PNG, encoded once for its file and TensorBoard."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


@contextmanager
def figure(
    size: tuple[float, float], save_to: str | Path | IO[bytes], dpi: int = 100, **savefig: Any
) -> Iterator[Any]:
    """A matplotlib figure with one axes (yielded), saved to ``save_to`` (a path or a binary
    buffer, as PNG) when the block ends, and always closed. Files only: never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=size, dpi=dpi)
    try:
        yield axes
        fig.tight_layout()
        close_and_save(fig, save_to, **savefig)
    finally:
        plt.close(fig)


def close_and_save(fig: Any, save_to: str | Path | IO[bytes], **savefig: Any) -> None:
    """Save a matplotlib figure made elsewhere (e.g. Lightning's LR finder plot) and close it."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(
            save_to, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}, **savefig
        )
    finally:
        plt.close(fig)


def to_pixels(images: torch.Tensor, preprocessing: Mapping[str, Any], tile: int) -> torch.Tensor:
    """Normalized ``[N, C, H, W]`` network inputs as ``[N, tile, tile, 3]`` uint8 pictures, on
    the images' device (``preprocessing``: the checkpoint's record, with ``mean`` and ``std``)."""
    mean = images.new_tensor(preprocessing["mean"]).view(1, -1, 1, 1)
    std = images.new_tensor(preprocessing["std"]).view(1, -1, 1, 1)
    images = F.interpolate(images.float(), size=(tile, tile), mode="bilinear", antialias=True)
    pixels = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1)
    return pixels.expand(-1, -1, -1, 3) if pixels.shape[-1] == 1 else pixels


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def short_name(name: str) -> str:
    """A class name for a picture: printable, and cut to a few characters."""
    name = printable(name)
    return name if len(name) <= _LABEL_CHARS else name[: _LABEL_CHARS - 1] + "…"


def render_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], max_side: int = 720
) -> Image.Image:
    """Draw the matrix: rows true, columns predicted, colour row-normalized, counts in the cells.

    Cells shrink with the number of classes so that the picture stays about ``max_side`` pixels;
    counts are drawn while cells are at least 22 px and class names while at least 9 px.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    n = len(class_names)
    cell = int(np.clip(max_side // max(n, 1), 1, 48))
    show_counts, show_names = cell >= 22, cell >= 9
    font = load_font(int(np.clip(cell // 2, 8, 13)))
    axis_font = load_font(13)
    names = [short_name(name) for name in class_names]
    label = max((int(font.getlength(name)) for name in names), default=0) + 6 if show_names else 0
    left, top = 22 + label, 8
    bottom = label + 26
    width, height = left + n * cell + 8, top + n * cell + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    rows = confusion.sum(axis=1, keepdims=True)
    normalized = ratio(confusion, np.broadcast_to(rows, confusion.shape))
    colours = (_LOW + normalized[..., None] * (_HIGH - _LOW)).round().astype(np.uint8)
    grid = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image.paste(Image.fromarray(grid, "RGB"), (left, top))
    if cell >= 6:
        for i in range(n + 1):  # thin cell borders
            draw.line([(left + i * cell, top), (left + i * cell, top + n * cell)], "#d0d0d0")
            draw.line([(left, top + i * cell), (left + n * cell, top + i * cell)], "#d0d0d0")
    if show_counts:
        for t in range(n):
            for p in range(n):
                colour = "white" if normalized[t, p] > 0.5 else "black"
                center = (left + p * cell + cell / 2, top + t * cell + cell / 2)
                draw.text(center, str(confusion[t, p]), fill=colour, font=font, anchor="mm")
    if show_names:
        for i, name in enumerate(names):
            y = top + i * cell + cell / 2
            draw.text((left - 4, y), name, fill="black", font=font, anchor="rm")
            _paste_vertical(image, name, font, (left + i * cell + cell / 2, top + n * cell + 4))
    draw.text((left + n * cell / 2, height - 4), "predicted", fill="black", font=axis_font,
              anchor="md")  # fmt: skip
    _paste_vertical(image, "true", axis_font, (10, top + n * cell / 2), center_y=True)
    return image


def _paste_vertical(
    image: Image.Image, text: str, font, at: tuple[float, float], center_y: bool = False
) -> None:
    """Paste ``text`` rotated 90 degrees (reading upwards), centred on x; top at y or centred."""
    length = int(font.getlength(text)) + 2
    size = int(getattr(font, "size", 11)) + 4
    strip = Image.new("L", (length, size), 0)
    ImageDraw.Draw(strip).text((0, size / 2), text, fill=255, font=font, anchor="lm")
    strip = strip.rotate(90, expand=True)  # now size wide, length high; text reads bottom-up
    x = int(at[0] - strip.width / 2)
    y = int(at[1] - strip.height / 2) if center_y else int(at[1])
    image.paste(Image.new("RGB", strip.size, "black"), (x, y), strip)


def image_grid(
    images: np.ndarray, captions: Sequence[str], columns: int = 8, tile: int = 112, pad: int = 4
) -> Image.Image:
    """Tile ``[N, H, W, 3]`` uint8 images in a grid, each with its (one- or two-line) caption;
    ``pad`` pixels between and around the tiles."""
    font = load_font(11)
    line_height = 13
    caption_height = line_height * max((c.count("\n") + 1 for c in captions), default=1) + 4
    count = len(images)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    width = columns * (tile + pad) + pad
    height = rows * (tile + caption_height + pad) + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x = pad + (i % columns) * (tile + pad)
        y = pad + (i // columns) * (tile + caption_height + pad)
        picture = Image.fromarray(pixels, "RGB")
        if picture.size != (tile, tile):
            picture = picture.resize((tile, tile), Image.BILINEAR)
        grid.paste(picture, (x, y))
        for j, line in enumerate(caption.split("\n")):
            draw.text((x, y + tile + 2 + j * line_height), line, fill="black", font=font)
    return grid
