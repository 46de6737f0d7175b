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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny CLI fit (96 px, 1 epoch, 1 step) on 3 classes; returns the directory it ran in.

    It holds ``data/`` and ``lightning_logs/version_0/`` with ``config.yaml`` and one weights-only
    ``checkpoints/best-*.ckpt`` (~187 MB instead of two ~560 MB files with Adam's state).
    """
    from alexnet_lit.training.cli import cli_main

    root = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(root / "data")
    overlay = root / "weights_only.yaml"
    overlay.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/acc, mode: max, save_weights_only: true,\n"
        "                  filename: 'best-{epoch:02d}', auto_insert_metric_name: false}\n"
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli_main(
            ["fit", "--config", str(config), "--config", str(overlay), f"--data.data_dir={data}",
             "--data.image_size=96", "--data.batch_size=4", "--data.num_workers=0",
             "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
             "--trainer.enable_progress_bar=false"]
        )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_run: Path) -> Path:
    """The tiny run's best checkpoint."""
    (ckpt,) = (tiny_run / "lightning_logs" / "version_0" / "checkpoints").glob("best-*.ckpt")
    return ckpt
