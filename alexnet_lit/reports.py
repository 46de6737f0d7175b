"""Evaluation reports and the pictures TensorBoard shows: all plain numpy and PIL, no Lightning.

A confusion matrix here is a ``[num_classes, num_classes]`` integer array whose row is the true
class and whose column is the predicted class.
"""

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from alexnet_lit.runs import open_text, printable

# Colour of a row-normalized cell: white (0) to dark blue (1), matplotlib's "Blues" end points.
_LOW = np.array([247, 251, 255], dtype=np.float64)
_HIGH = np.array([8, 48, 107], dtype=np.float64)
_LABEL_CHARS = 16  # class names are cut to this many characters in pictures


def per_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class (0 where a ratio has no denominator)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    true_positives = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(true_positives, predicted)
    recall = _ratio(true_positives, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)
    return out


def most_confused(confusion: np.ndarray, class_names: Sequence[str], top: int = 10) -> list[dict]:
    """The largest off-diagonal cells: which true class is most often taken for which other.

    Each entry has ``true``, ``predicted``, ``count`` and ``share``, the fraction of the true
    class's images that went to ``predicted``. Sorted by count, then share; empty cells are left
    out.
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    support = confusion.sum(axis=1)
    pairs = [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "count": int(confusion[t, p]),
            "share": float(confusion[t, p] / support[t]),
        }
        for t, p in zip(*np.nonzero(confusion), strict=True)
        if t != p
    ]
    pairs.sort(key=lambda pair: (-pair["count"], -pair["share"], pair["true"], pair["predicted"]))
    return pairs[:top]


def write_report(
    confusion: np.ndarray,
    class_names: Sequence[str],
    out_dir: str | Path,
    stage: str,
    title: str | None = None,
    top_pairs: int = 10,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``{stage}_report.csv``, ``{stage}_confused_pairs.csv``, ``{stage}_report.md`` and
    ``{stage}_confusion_matrix.png`` into ``out_dir``; returns the paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    confusion = np.asarray(confusion, dtype=np.int64)
    rows = per_class_metrics(confusion, class_names)
    pairs = most_confused(confusion, class_names, top_pairs)
    paths = {
        "csv": out_dir / f"{stage}_report.csv",
        "pairs_csv": out_dir / f"{stage}_confused_pairs.csv",
        "markdown": out_dir / f"{stage}_report.md",
        "confusion_matrix": out_dir / f"{stage}_confusion_matrix.png",
    }
    _write_csv(paths["csv"], ["class", "precision", "recall", "f1", "support"], rows)
    _write_csv(paths["pairs_csv"], ["true", "predicted", "count", "share"], pairs)
    with open_text(paths["markdown"]) as file:
        file.write(_markdown(confusion, rows, pairs, title or f"{stage} report", notes))
    render_confusion_matrix(confusion, class_names).save(paths["confusion_matrix"])
    return paths


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open_text(path) as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def _markdown(
    confusion: np.ndarray, rows: list[dict], pairs: list[dict], title: str, notes: Sequence[str]
) -> str:
    total = int(confusion.sum())
    accuracy = np.trace(confusion) / total if total else 0.0
    macro = {key: np.mean([row[key] for row in rows]) for key in ("precision", "recall", "f1")}
    lines = [
        f"# {title}",
        "",
        f"{total} images, accuracy {accuracy:.4f}; macro precision {macro['precision']:.4f}, "
        f"recall {macro['recall']:.4f}, F1 {macro['f1']:.4f}.",
        *(line for note in notes for line in ("", note)),
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {_cell(r['class'])} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} "
        f"| {r['support']} |"
        for r in rows
    ]
    lines += ["", "## Most confused pairs", ""]
    if pairs:
        lines += ["| true | predicted as | count | share of true |", "| --- | --- | ---: | ---: |"]
        lines += [
            f"| {_cell(p['true'])} | {_cell(p['predicted'])} | {p['count']} | {p['share']:.4f} |"
            for p in pairs
        ]
    else:
        lines.append("No image was misclassified.")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


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
    normalized = _ratio(confusion, np.broadcast_to(rows, confusion.shape))
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
    images: np.ndarray, captions: Sequence[str], columns: int = 8, tile: int = 112
) -> Image.Image:
    """Tile ``[N, H, W, 3]`` uint8 images in a grid, each with its (one- or two-line) caption."""
    font = load_font(11)
    line_height = 13
    caption_height = line_height * max((c.count("\n") + 1 for c in captions), default=1) + 4
    count = len(images)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    pad = 4
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
