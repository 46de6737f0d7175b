"""Write a small photo-like ImageFolder for measuring the audits offline: one shape per class
(circle, square, triangle, ...) drawn over random crops of scikit-learn's two bundled photos,
saved as JPEGs, with some labels deliberately flipped.

python scripts/bench/photo_like.py OUT --classes circle square triangle --per-class 40 --flip 4

Writes ``OUT/train/<class>/*.jpg`` (and ``OUT/val/`` with ``--val-per-class``); the flipped
images (drawn as one class, filed under another) are listed in ``OUT/flipped.txt``.
"""

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon")


def polygon(sides: int, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(turn + 2 * math.pi * k / sides),
         cy + r * math.sin(turn + 2 * math.pi * k / sides))
        for k in range(sides)
    ]  # fmt: skip


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, turn: float,
    colour: tuple[int, int, int],
) -> None:  # fmt: skip
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=max(3, int(r / 4)))
    elif shape == "square":
        draw.polygon(polygon(4, cx, cy, r, turn + math.pi / 4), fill=colour)
    elif shape == "diamond":
        draw.polygon(polygon(4, cx, cy, r, math.pi / 2), fill=colour)
    elif shape == "triangle":
        draw.polygon(polygon(3, cx, cy, r, turn), fill=colour)
    elif shape == "hexagon":
        draw.polygon(polygon(6, cx, cy, r, turn), fill=colour)
    elif shape == "star":
        outer = polygon(5, cx, cy, r, turn)
        inner = polygon(5, cx, cy, r * 0.4, turn + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def photo_like(shape: str, rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    """A 256x192 crop of a photo, at a random scale, with ``shape`` drawn on it."""
    photo = photos[rng.integers(len(photos))]
    height, width = photo.shape[:2]
    crop_h = int(rng.integers(96, height))
    crop_w = min(width, int(crop_h * 4 / 3))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    crop = Image.fromarray(photo[top : top + crop_h, left : left + crop_w])
    image = crop.resize((256, 192), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    r = float(rng.uniform(28, 70))
    cx, cy = rng.uniform(r, 256 - r), rng.uniform(r, 192 - r)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw_shape(draw, shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi)), colour)
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))


def main() -> None:
    from sklearn.datasets import load_sample_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", nargs="+", default=["circle", "square", "triangle"])
    parser.add_argument("--per-class", type=int, default=40, help="train images per class")
    parser.add_argument("--val-per-class", type=int, default=0)
    parser.add_argument(
        "--flip", type=int, default=0, help="train images filed under a wrong class"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = list(load_sample_images().images)
    flipped = []
    for split, count in (("train", args.per_class), ("val", args.val_per_class)):
        for label, shape in enumerate(args.classes):
            for i in range(count):
                folder = args.out / split / shape
                # Every len(classes)-th flip per class: the first images of each class in turn.
                if split == "train" and i < args.flip // len(args.classes) + (
                    label < args.flip % len(args.classes)
                ):
                    folder = args.out / split / args.classes[(label + 1) % len(args.classes)]
                    flipped.append(folder / f"{shape}_{i:03d}.jpg")
                folder.mkdir(parents=True, exist_ok=True)
                photo_like(shape, rng, photos).save(folder / f"{shape}_{i:03d}.jpg", quality=90)
    (args.out / "flipped.txt").write_text("".join(f"{p}\n" for p in flipped))
    print(f"wrote {args.out} ({len(flipped)} flipped: {args.out / 'flipped.txt'})")


if __name__ == "__main__":
    main()
