"""The ImageFolder DataModule: roots, splits, presets, loaders, worker counts and the class list."""

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from alexnet_lit import transforms
from alexnet_lit.distributed import UnpaddedDistributedSampler

# Folders that tools and operating systems drop into datasets; never classes.
_IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
DEMO_CLASSES = [str(digit) for digit in range(10)]
# Augmentation presets, used where image_size, crop_scale or hflip are left unset (None).
TUTORIAL_PRESET = {"image_size": transforms.IMAGE_SIZE, "crop_scale": (0.08, 1.0), "hflip": True}
# The demo's digits are 8x8 pixels: 96 px trains ~3x faster than 224 at the same accuracy, a flip
# turns digits into other shapes, and crops under half the area cut them into single strokes.
DEMO_PRESET = {"image_size": 96, "crop_scale": (0.5, 1.0), "hflip": False}


class DataConfigError(ValueError):
    """A problem with the user's data or data settings, explained in one sentence."""


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is a system or hidden entry (``.DS_Store``, ``__MACOSX``)."""
    return name.startswith(".") or name in _IGNORED_NAMES


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split, without hidden and system folders."""
    return sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not is_hidden(entry.name)
    )


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), skipping hidden entries."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found += [
            Path(dirpath, name)
            for name in sorted(filenames)
            if not is_hidden(name) and name.lower().endswith(IMG_EXTENSIONS)
        ]
    return found


def load_image(path: str | Path, in_channels: int = 3) -> Image.Image:
    """Open an image as RGB (or grayscale for ``in_channels=1``), with EXIF rotation applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("L" if in_channels == 1 else "RGB")


class ImageListDataset(Dataset):
    """Labelled images from a list of ``(path, class_index)`` pairs.

    Args:
        samples: ``(path, class_index)`` pairs; the index is -1 for unlabelled images.
        transform: Applied to each loaded PIL image.
        in_channels: 3 for RGB or 1 for grayscale.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform, in_channels: int = 3):
        self.samples = list(samples)
        self.transform = transform
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(load_image(path, self.in_channels)), target


def default_num_workers() -> int:
    """Loader workers the machine can feed: usable CPUs minus the training process, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def demo_dir() -> Path:
    """Where the built-in demo dataset is written: ``$XDG_CACHE_HOME/alexnet-lit/digits``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache, "alexnet-lit", "digits-v1")


def write_digits_demo(root: Path, val_fraction: float = 0.2, seed: int = 0) -> None:
    """Write scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as an ImageFolder.

    Each digit is upscaled to 32x32 with bicubic interpolation and saved as a grayscale PNG under
    ``root/{train,val}/<digit>/``. The split is stratified and seeded, so it is the same on every
    machine. The folder is written to a temporary sibling and renamed, so a crash never leaves a
    half-written dataset behind.
    """
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for digit in range(10):
            indices = rng.permutation(np.flatnonzero(digits.target == digit))
            n_val = round(len(indices) * val_fraction)
            for split, split_indices in (("val", indices[:n_val]), ("train", indices[n_val:])):
                folder = staging / split / str(digit)
                folder.mkdir(parents=True)
                for i in split_indices:
                    image = Image.fromarray(pixels[i], mode="L").resize((32, 32), Image.BICUBIC)
                    image.save(folder / f"digit_{i:04d}.png")
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ImageFolderDataModule(L.LightningDataModule):
    """Train/val(/test) ImageFolders: ``data_dir/{train,val}/<class>/*.jpg``.

    Args:
        data_dir: Dataset root holding ``train/`` and ``val/`` (and optionally ``test/``). None
            trains on the built-in demo: scikit-learn's handwritten digits, written once by
            :meth:`prepare_data`.
        batch_size: Images per training step (the tutorial's 32); evaluation uses the same.
        num_workers: Loader processes per loader; None picks what the machine can feed.
        image_size: Side of the square network input. None: the tutorial's 224 for your data,
            96 for the demo's 8x8 digits.
        in_channels: 3 for RGB, 1 to train on grayscale.
        crop_scale: Area range of the training RandomResizedCrop. None: the tutorial's
            (0.08, 1.0) for your data, (0.5, 1.0) for the demo.
        hflip: Random horizontal flips in training. None: on for your data (the tutorial's),
            off for the demo's digits.
        predict_dir: Folder of images (searched recursively) for the ``predict`` subcommand;
            None predicts the validation images.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        in_channels: int = 3,
        crop_scale: tuple[float, float] | None = None,
        hflip: bool | None = None,
        predict_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.is_demo = data_dir is None
        self.data_dir = demo_dir() if self.is_demo else Path(data_dir).expanduser()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.predict_dir = None if predict_dir is None else Path(predict_dir).expanduser()
        if batch_size < 1:
            raise DataConfigError(f"data.batch_size must be at least 1, got {batch_size}.")
        if in_channels not in (1, 3):
            raise DataConfigError(f"data.in_channels must be 1 or 3, got {in_channels}.")
        # Read now, not in setup(): the CLI links the class list into the model at instantiation.
        self.class_names = DEMO_CLASSES if self.is_demo else self._read_class_names()
        preset = DEMO_PRESET if self.is_demo else TUTORIAL_PRESET
        self.image_size = preset["image_size"] if image_size is None else image_size
        self.crop_scale = preset["crop_scale"] if crop_scale is None else tuple(crop_scale)
        self.hflip = preset["hflip"] if hflip is None else hflip
        self.preprocessing = transforms.preprocessing_record(self.image_size, in_channels)
        self.datasets: dict[str, ImageListDataset] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _read_class_names(self) -> list[str]:
        if not self.data_dir.is_dir():
            raise DataConfigError(
                f"data.data_dir: folder '{self.data_dir}' does not exist; pass --data.data_dir "
                "pointing at a folder with train/<class>/ and val/<class>/ inside."
            )
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir():
            raise DataConfigError(
                f"'{train_dir}' does not exist; put the training images in train/<class>/ "
                "under data.data_dir."
            )
        class_names = list_classes(train_dir)
        if not class_names:
            raise DataConfigError(
                f"'{train_dir}' has no class folders; put each class's images in its own "
                "subfolder, e.g. train/cat/ and train/dog/."
            )
        return class_names

    def prepare_data(self) -> None:
        if self.is_demo and not self.data_dir.is_dir():
            write_digits_demo(self.data_dir)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.datasets["train"] = self._split("train", self.train_transform())
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._split("val", self.eval_transform())
        if stage == "test":
            # A held-out test/ split is optional; without one, test reports on val/.
            split = "test" if (self.data_dir / "test").is_dir() else "val"
            self.datasets["test"] = self._split(split, self.eval_transform())
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset()

    def train_transform(self):
        return transforms.train_transform(
            self.image_size, self.hparams.in_channels, crop_scale=self.crop_scale, hflip=self.hflip
        )

    def eval_transform(self):
        return transforms.eval_transform(**self.preprocessing)

    def _split(self, split: str, transform) -> ImageListDataset:
        split_dir = self.data_dir / split
        if not split_dir.is_dir():
            raise DataConfigError(
                f"'{split_dir}' does not exist; put the {split} images in {split}/<class>/ "
                "under data.data_dir."
            )
        unknown = sorted(set(list_classes(split_dir)) - set(self.class_names))
        if unknown:
            raise DataConfigError(
                f"'{split_dir}' has classes that train/ does not: {', '.join(unknown)}; "
                "add them to train/ or remove them."
            )
        samples = [
            (path, index)
            for index, name in enumerate(self.class_names)
            if (split_dir / name).is_dir()
            for path in list_images(split_dir / name)
        ]
        if not samples:
            raise DataConfigError(
                f"'{split_dir}' has no images ({', '.join(sorted(IMG_EXTENSIONS))}); "
                f"put them in {split}/<class>/."
            )
        return ImageListDataset(samples, transform, self.hparams.in_channels)

    def _predict_dataset(self) -> ImageListDataset:
        if self.predict_dir is None:
            return self._split("val", self.eval_transform())
        if not self.predict_dir.exists():
            raise DataConfigError(
                f"data.predict_dir: '{self.predict_dir}' does not exist; pass an image folder."
            )
        paths = [self.predict_dir] if self.predict_dir.is_file() else list_images(self.predict_dir)
        if not paths:
            raise DataConfigError(f"data.predict_dir: '{self.predict_dir}' holds no images.")
        return ImageListDataset(
            [(p, -1) for p in paths], self.eval_transform(), self.hparams.in_channels
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"])

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        sampler = None
        if not shuffle and self.trainer is not None and self.trainer.world_size > 1:
            # Evaluation under DDP: each image exactly once, so metrics are exact. Training keeps
            # Lightning's shuffling DistributedSampler (it calls set_epoch every epoch).
            world_size = self.trainer.world_size
            if len(dataset) < world_size:
                raise DataConfigError(
                    f"{len(dataset)} evaluation images cannot be split over {world_size} "
                    "processes; add images or lower trainer.devices / trainer.num_nodes."
                )
            sampler = UnpaddedDistributedSampler(dataset, world_size, self.trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_cuda,
        )
