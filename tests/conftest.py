"""Shared fixtures: tiny ImageFolder datasets generated in tmp_path, never downloaded."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["ant", "bee", "cat"]


def make_image_folder(
    root: Path,
    classes: list[str] = CLASSES,
    splits: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/img_N.jpg``: small JPEGs of varied sizes, tinted per class."""
    splits = splits or {"train": 4, "val": 2}
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                height, width = rng.integers(24, 72, size=2)
                pixels = rng.integers(0, 90, size=(height, width, 3))
                pixels[..., label % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i}.jpg")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A 3-class dataset with train/ (4 per class) and val/ (2 per class)."""
    return make_image_folder(tmp_path / "data")
