"""The ImageFolder DataModule: roots, splits, presets, loaders, worker counts and the class list."""

import csv
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from alexnet_lit import transforms
from alexnet_lit.device_decode import DeviceAugment, decode_batch, read_for_device
from alexnet_lit.distributed import UnpaddedDistributedSampler
from alexnet_lit.images import is_hidden, load_image
from alexnet_lit.scan import (
    SplitScan,
    class_count_table,
    image_files,
    imbalance_ratio,
    list_classes,
    scan_files,
    scan_split,
    split_train_val,
    walk_files,
)

__all__ = ["is_hidden", "list_classes", "load_image"]  # re-exported: their home moved

DEMO_CLASSES = [str(digit) for digit in range(10)]
# Augmentation presets, used where image_size, crop_scale or hflip are left unset (None).
TUTORIAL_PRESET = {"image_size": transforms.IMAGE_SIZE, "crop_scale": (0.08, 1.0), "hflip": True}
# The demo's digits are 8x8 pixels: 96 px trains ~3x faster than 224 at the same accuracy, a flip
# turns digits into other shapes, and crops under half the area cut them into single strokes.
DEMO_PRESET = {"image_size": 96, "crop_scale": (0.5, 1.0), "hflip": False}
# Files written into the run directory (the logger's log_dir).
SKIPPED_FILE = "skipped_images.csv"
SPLIT_FILES = {"train": "split_train.txt", "val": "split_val.txt"}


class DataConfigError(ValueError):
    """A problem with the user's data or data settings, explained in one sentence."""


def list_images(folder: Path) -> list[Path]:
    """Usable images under ``folder`` (recursively, sorted), by content; hidden entries skipped."""
    infos, _, _, _ = scan_files(walk_files(Path(folder), []))
    return sorted(infos)


class BadImage(NamedTuple):
    """What a dataset returns, instead of a sample, for an image that fails to load."""

    path: str
    reason: str


def bad_image(path: str | Path, err: Exception) -> BadImage:
    """The record of an image that raised ``err`` while loading."""
    lines = str(err).strip().splitlines()
    return BadImage(str(path), f"{type(err).__name__}: {lines[0] if lines else ''}")


class LoadedBatch(NamedTuple):
    """A collated batch before the DataModule records and drops ``skipped`` (main process)."""

    images: torch.Tensor
    targets: torch.Tensor
    skipped: list[BadImage]


class EncodedBatch(NamedTuple):
    """A ``decode_on_device`` batch from the workers: per-image uint8 tensors of any size, each
    a plain JPEG's bytes (1-D) or a CPU-decoded image (``[C,H,W]``), decoded and augmented by
    :meth:`ImageFolderDataModule.on_before_batch_transfer`."""

    images: list[torch.Tensor]
    targets: torch.Tensor
    paths: list[str]
    skipped: list[BadImage]
    train: bool  # the train preset (random crop, flip) or the eval one


class ImageListDataset(Dataset):
    """Labelled images from a list of ``(path, class_index)`` pairs.

    Args:
        samples: ``(path, class_index)`` pairs; the index is -1 for unlabelled images.
        transform: Applied to each loaded PIL image.
        in_channels: 3 for RGB or 1 for grayscale.
        skip_bad: Return a :class:`BadImage` for an image that fails to load, instead of
            raising; :class:`SkippingCollate` drops it from the batch.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform,
        in_channels: int = 3,
        skip_bad: bool = False,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.in_channels = in_channels
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | BadImage:
        path, target = self.samples[index]
        try:
            image = load_image(path, self.in_channels)
        except Exception as err:  # a broken file raises anything from OSError to SyntaxError
            if not self.skip_bad:
                raise
            return bad_image(path, err)
        return self.transform(image), target

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.samples]


class EncodedImageDataset(ImageListDataset):
    """The worker side of ``decode_on_device``: ``(uint8 tensor, class_index, path)`` samples.

    The tensor is a plain JPEG's encoded bytes, or any other image decoded by ``load_image``
    (see :func:`~alexnet_lit.device_decode.read_for_device`). ``transform`` is not applied
    here: the main process applies the same preset on the device.
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str] | BadImage:
        path, target = self.samples[index]
        try:
            image = read_for_device(path, self.in_channels)
        except Exception as err:
            if not self.skip_bad:
                raise
            return bad_image(path, err)
        return image, target, str(path)


class EncodedCollate:
    """Collates :class:`EncodedImageDataset` samples into an :class:`EncodedBatch` (workers)."""

    def __init__(self, train: bool):
        self.train = train

    def __call__(self, batch: list) -> EncodedBatch:
        skipped = [item for item in batch if isinstance(item, BadImage)]
        good = [item for item in batch if not isinstance(item, BadImage)]
        targets = torch.tensor([target for _, target, _ in good], dtype=torch.long)
        images = [image for image, _, _ in good]
        return EncodedBatch(images, targets, [path for _, _, path in good], skipped, self.train)


class SkippingCollate:
    """Collates the good samples of a batch and keeps the :class:`BadImage` markers aside.

    Runs in the loader workers; the markers travel with the batch to the main process, where
    :meth:`ImageFolderDataModule.on_before_batch_transfer` records them. A batch of only bad
    images becomes an empty one of ``empty_shape``.
    """

    def __init__(self, empty_shape: tuple[int, int, int]):
        self.empty_shape = tuple(empty_shape)

    def __call__(self, batch: list) -> LoadedBatch:
        skipped = [item for item in batch if isinstance(item, BadImage)]
        good = [item for item in batch if not isinstance(item, BadImage)]
        if not good:
            empty = torch.empty((0, *self.empty_shape))
            return LoadedBatch(empty, torch.empty(0, dtype=torch.long), skipped)
        images, targets = default_collate(good)
        return LoadedBatch(images, targets, skipped)


class BalancedSampler(DistributedSampler):
    """Draws classes equally often (with replacement), each process a disjoint share of one draw.

    Every process draws the same ``len(dataset)`` (rounded up to a multiple of the number of
    processes) indices, weighted by 1 / class count, from a generator seeded by ``seed + epoch``,
    and takes every ``num_replicas``-th one from its rank. It subclasses DistributedSampler so
    that Lightning calls ``set_epoch`` and does not wrap it again under DDP.
    """

    def __init__(self, targets: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(
            range(len(targets)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        counts = torch.bincount(torch.as_tensor(targets))
        self.weights = 1.0 / counts[torch.as_tensor(targets)].double()

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(
            self.weights, self.total_size, replacement=True, generator=generator
        )
        return iter(draw[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def default_num_workers(processes: int = 1) -> int:
    """Loader workers for each of ``processes`` training processes on this machine.

    The CPUs this process may use (its affinity, not the machine's count) are shared out, one
    kept for each training process, at most 16 each: a 16-vCPU GPU machine was still loader-bound
    with 16 workers (README, Speed), and every worker costs memory and start-up time.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        cpus = os.cpu_count() or 1
    return max(0, min(16, cpus // max(1, processes) - 1))


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

    Hidden and system entries are never classes nor samples; files that are not images (by
    content) are ignored and counted; unreadable images found by cheap header checks are left
    out before training, and images that fail to load are skipped. Both are written to
    ``skipped_images.csv`` in the run directory (see ``on_bad_image``).

    Args:
        data_dir: Dataset root holding ``train/`` and ``val/`` (and optionally ``test/``). None
            trains on the built-in demo: scikit-learn's handwritten digits, written once by
            :meth:`prepare_data`.
        batch_size: Images per training step (the tutorial's 32); evaluation uses the same.
        num_workers: Loader processes per loader; None shares out the CPUs this process may
            use among the machine's training processes, keeping one for each, at most 16.
        image_size: Side of the square network input. None: the tutorial's 224 for your data,
            96 for the demo's 8x8 digits.
        in_channels: 3 for RGB, 1 to train on grayscale.
        crop_scale: Area range of the training RandomResizedCrop. None: the tutorial's
            (0.08, 1.0) for your data, (0.5, 1.0) for the demo.
        hflip: Random horizontal flips in training. None: on for your data (the tutorial's),
            off for the demo's digits.
        predict_dir: Folder of images (searched recursively) for the ``predict`` subcommand;
            None predicts the validation images.
        val_split: Without a ``val/`` folder, the fraction of each train class held out for
            validation (a stratified split that depends only on the file list and ``seed``; the
            lists are saved as ``split_train.txt`` and ``split_val.txt`` in the run directory).
        seed: Seeds that split and the balanced sampler.
        on_bad_image: ``skip`` leaves unreadable images out and records them; ``error`` stops
            at the first one with a message naming it.
        balance: Class-imbalance correction: ``none``; ``loss`` weights the cross-entropy by
            n_images / (n_classes * n_class_images); ``sampler`` draws every class equally often
            (with replacement; works under DDP).
        augment: Training augmentation preset: ``"tutorial"`` (crop + flip) or ``"strong"``
            (adds TrivialAugmentWide and RandomErasing). MixUp/CutMix are model options.
        decode_on_device: For GPUs whose loader workers cannot keep up: workers only read the
            train/val/test JPEGs, and the main process decodes each batch in one
            ``decode_jpeg`` call on the training device and augments it there (same presets;
            random parameters from torch's global RNG, seeded by ``seed_everything``). Other
            files (PNG, CMYK, EXIF-rotated, grayscale training) are still decoded by the
            workers. Predict keeps the normal path.
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
        val_split: float = 0.1,
        seed: int = 0,
        on_bad_image: Literal["skip", "error"] = "skip",
        balance: Literal["none", "loss", "sampler"] = "none",
        augment: Literal["tutorial", "strong"] = "tutorial",
        decode_on_device: bool = False,
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
        if not 0.0 < val_split < 1.0:
            raise DataConfigError(f"data.val_split must be between 0 and 1, got {val_split}.")
        if on_bad_image not in ("skip", "error"):
            raise DataConfigError(f"data.on_bad_image must be skip or error, got {on_bad_image}.")
        if balance not in ("none", "loss", "sampler"):
            raise DataConfigError(f"data.balance must be none, loss or sampler, got {balance}.")
        # Read now, not in setup(): the CLI links the class list into the model at instantiation.
        self.class_names = DEMO_CLASSES if self.is_demo else self._read_class_names()
        preset = DEMO_PRESET if self.is_demo else TUTORIAL_PRESET
        self.image_size = preset["image_size"] if image_size is None else image_size
        self.crop_scale = preset["crop_scale"] if crop_scale is None else tuple(crop_scale)
        self.hflip = preset["hflip"] if hflip is None else hflip
        self.preprocessing = transforms.preprocessing_record(self.image_size, in_channels)
        self.datasets: dict[str, ImageListDataset] = {}
        self.skipped: dict[str, tuple[str, str]] = {}  # path -> (reason, when), in record order
        self.run_dir: Path | None = None
        self._scans: dict[str, SplitScan] = {}
        self._samples: dict[str, list[tuple[Path, int]]] = {}
        self._written: set[str] = set()
        self._split_lists: dict[str, dict[str, list[Path]]] = {}
        self._device_augment: dict[bool, DeviceAugment] = {}  # train? -> preset

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_weights(self) -> list[float] | None:
        """Cross-entropy class weights for ``balance: loss`` (linked into the model), else None."""
        if self.hparams.balance != "loss":
            return None
        counts = [0] * self.num_classes
        for _, target in self._labelled("train"):
            counts[target] += 1
        total = sum(counts)
        return [total / (self.num_classes * count) for count in counts]

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
        if self.trainer is not None and self.run_dir is None:
            # log_dir is a collective call under DDP: resolve it here, where all ranks run.
            log_dir = self.trainer.log_dir
            self.run_dir = None if log_dir is None else Path(log_dir)
            self._write_record()  # what a scan at instantiation found
        if self.hparams.num_workers is None and self.trainer is not None:
            # With several processes per machine (DDP), each gets its share of the CPUs.
            self.num_workers = default_num_workers(self.trainer.num_devices)
        if stage == "fit":
            self.datasets["train"] = self._dataset("train", self.train_transform())
            self._report_class_counts()
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset("val", self.eval_transform())
        if stage == "test":
            # A held-out test/ split is optional; without one, test reports on val.
            split = "test" if (self.data_dir / "test").is_dir() else "val"
            note = "" if split == "test" else " (there is no test/ folder)"
            rank_zero_info(f"test: evaluating {self.data_dir / split}{note}")
            self.datasets["test"] = self._dataset(split, self.eval_transform())
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset()
        self._save_split_lists()

    def train_transform(self):
        return transforms.train_transform(
            self.image_size,
            self.hparams.in_channels,
            crop_scale=self.crop_scale,
            hflip=self.hflip,
            augment=self.hparams.augment,
        )

    def eval_transform(self):
        return transforms.eval_transform(**self.preprocessing)

    def _dataset(self, split: str, transform, on_device: bool = True) -> ImageListDataset:
        on_device = on_device and self.hparams.decode_on_device
        dataset_class = EncodedImageDataset if on_device else ImageListDataset
        return dataset_class(
            self._labelled(split), transform, self.hparams.in_channels, skip_bad=True
        )

    def _scan(self, split: str) -> SplitScan:
        """Scan a split folder once: cheap checks, then report what was left out."""
        if split in self._scans:
            return self._scans[split]
        split_dir = self.data_dir / split
        if not split_dir.is_dir():
            raise DataConfigError(
                f"'{split_dir}' does not exist; put the {split} images in {split}/<class>/ "
                "under data.data_dir."
            )
        scan = self._scans[split] = scan_split(split_dir)
        for path, reason in scan.unreadable:
            self._record_bad(str(path), reason, "scan")
        if scan.unreadable:
            rank_zero_warn(
                f"{split}/: {len(scan.unreadable)} unreadable image(s) left out before training, "
                f"e.g. '{scan.unreadable[0][0]}' ({scan.unreadable[0][1]}); "
                f"listed in {self._record_name()}."
            )
        if scan.not_images:
            rank_zero_warn(
                f"{split}/: ignored {len(scan.not_images)} file(s) that are not images, "
                f"e.g. '{scan.not_images[0][0]}'."
            )
        ignored = len(scan.hidden) + len(scan.outside_classes)
        if ignored:
            rank_zero_info(
                f"{split}/: ignored {len(scan.hidden)} hidden or system entries and "
                f"{len(scan.outside_classes)} file(s) outside class folders."
            )
        return scan

    def _labelled(self, split: str) -> list[tuple[Path, int]]:
        """``(path, class_index)`` of a split's usable images; labels follow the train classes."""
        if split in ("train", "val") and "train" not in self._samples:
            self._train_and_val()
        if split not in self._samples:
            images = self._checked_images(split)
            self._samples[split] = self._index(images)
        return self._samples[split]

    def _train_and_val(self) -> None:
        train = self._scan("train").images
        empty = [name for name in self.class_names if not train.get(name)]
        if empty:
            names = ", ".join(f"'{name}'" for name in empty)
            plural = len(empty) > 1
            raise DataConfigError(
                f"train class{'es' if plural else ''} {names} in '{self.data_dir / 'train'}' "
                f"ha{'ve' if plural else 's'} no usable image; add images or remove the "
                f"folder{'s' if plural else ''} (python scripts/check_data.py lists the problems)."
            )
        if (self.data_dir / "val").is_dir():
            val = self._checked_images("val")
        else:
            train, val = split_train_val(
                train, self.hparams.val_split, self.hparams.seed, self.data_dir
            )
            rank_zero_info(
                f"no '{self.data_dir / 'val'}': holding out {self.hparams.val_split:g} of each "
                f"train class for validation (seed {self.hparams.seed})."
            )
            self._split_lists = {"train": train, "val": val}
        self._samples["train"] = self._index(train)
        self._samples["val"] = self._index(val)

    def _checked_images(self, split: str) -> dict[str, list[Path]]:
        split_dir = self.data_dir / split
        images = self._scan(split).images
        unknown = sorted(set(images) - set(self.class_names))
        if unknown:
            raise DataConfigError(
                f"'{split_dir}' has classes that train/ does not: {', '.join(unknown)}; "
                "add them to train/ or remove them."
            )
        if not any(images.values()):
            raise DataConfigError(
                f"'{split_dir}' has no images (by content: JPEG, PNG, GIF, BMP, TIFF, WebP, "
                f"PPM); put them in {split}/<class>/."
            )
        missing = [name for name in self.class_names if not images.get(name)]
        if missing:
            rank_zero_warn(f"'{split_dir}' has no images of train classes: {', '.join(missing)}.")
        return images

    def _index(self, images: dict[str, list[Path]]) -> list[tuple[Path, int]]:
        return [
            (path, index)
            for index, name in enumerate(self.class_names)
            for path in images.get(name, [])
        ]

    def _save_split_lists(self) -> None:
        """Write the train/val split made from train/ into the run directory (rank 0, once)."""
        if not self._split_lists or self.run_dir is None or not self.trainer.is_global_zero:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for split, images in self._split_lists.items():
            lines = [
                path.relative_to(self.data_dir).as_posix()
                for name in self.class_names
                for path in images.get(name, [])
            ]
            (self.run_dir / SPLIT_FILES[split]).write_text("".join(f"{line}\n" for line in lines))

    def _report_class_counts(self) -> None:
        counts = {}
        for split in ("train", "val"):
            per_class = [0] * self.num_classes
            for _, target in self._labelled(split):
                per_class[target] += 1
            counts[split] = dict(zip(self.class_names, per_class, strict=True))
        ratio = imbalance_ratio(counts["train"])
        ratio_text = "n/a" if ratio is None else f"{ratio:.2f}:1"
        rank_zero_info(
            f"images per class (train imbalance {ratio_text}, balance: "
            f"{self.hparams.balance}):\n{class_count_table(counts)}"
        )

    def _predict_dataset(self) -> ImageListDataset:
        if self.predict_dir is None:
            return self._dataset("val", self.eval_transform(), on_device=False)
        if not self.predict_dir.exists():
            raise DataConfigError(
                f"data.predict_dir: '{self.predict_dir}' does not exist; pass an image folder."
            )
        # By name, not content: a broken file is loaded, fails, and still gets its error row.
        paths = [self.predict_dir] if self.predict_dir.is_file() else image_files(self.predict_dir)
        if not paths:
            raise DataConfigError(f"data.predict_dir: '{self.predict_dir}' holds no images.")
        return ImageListDataset(
            [(p, -1) for p in paths], self.eval_transform(), self.hparams.in_channels, True
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        if self.hparams.balance != "sampler":
            return self._loader(dataset, shuffle=True, train=True)
        trainer = self.trainer
        sampler = BalancedSampler(
            dataset.targets,
            num_replicas=1 if trainer is None else trainer.world_size,
            rank=0 if trainer is None else trainer.global_rank,
            seed=self.hparams.seed,
        )
        return self._loader(dataset, sampler=sampler, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"])

    def _loader(
        self, dataset: Dataset, shuffle: bool = False, sampler=None, train: bool = False
    ) -> DataLoader:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if sampler is None and not shuffle and distributed:
            # Evaluation under DDP: each image exactly once, so metrics are exact. Training keeps
            # Lightning's shuffling DistributedSampler (it calls set_epoch every epoch).
            world_size = self.trainer.world_size
            if len(dataset) < world_size:
                raise DataConfigError(
                    f"{len(dataset)} evaluation images cannot be split over {world_size} "
                    "processes; add images or lower trainer.devices / trainer.num_nodes."
                )
            sampler = UnpaddedDistributedSampler(dataset, world_size, self.trainer.global_rank)
        if isinstance(dataset, EncodedImageDataset):
            collate = EncodedCollate(train)
        else:
            collate = SkippingCollate((self.hparams.in_channels, self.image_size, self.image_size))
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_cuda,
            collate_fn=collate,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the images the workers could not load, then hand on ``(images, targets)``.

        With ``decode_on_device`` this is where a batch is decoded and augmented on the device:
        here, before the transfer, because ``decode_jpeg`` takes its input on the CPU.
        """
        if not isinstance(batch, LoadedBatch | EncodedBatch):
            return batch
        for bad in batch.skipped:
            self._record_bad(bad.path, bad.reason, "load")  # raises with on_bad_image: error
        if isinstance(batch, EncodedBatch):
            return self._decode_and_augment(batch)
        return batch.images, batch.targets

    def _decode_and_augment(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device("cpu") if self.trainer is None else self.trainer.strategy.root_device
        images, failures = decode_batch(batch.images, batch.paths, device)
        for path, err in failures:
            bad = bad_image(path, err)
            self._record_bad(bad.path, bad.reason, "load")
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:  # the same empty batch as SkippingCollate's
            shape = (0, self.hparams.in_channels, self.image_size, self.image_size)
            return torch.empty(shape), torch.empty(0, dtype=torch.long)
        if batch.train not in self._device_augment:
            preset = self.train_transform() if batch.train else self.eval_transform()
            self._device_augment[batch.train] = DeviceAugment(preset)
        images = self._device_augment[batch.train]([images[i] for i in keep])
        return images, batch.targets[keep]

    def _record_name(self) -> str:
        return str(self.run_dir / SKIPPED_FILE) if self.run_dir else "dm.skipped"

    def _record_bad(self, path: str, reason: str, when: str) -> None:
        """Write a left-out image to ``skipped_images.csv`` once (per process; rank N > 0 writes
        ``skipped_images.rankN.csv``), or raise with ``on_bad_image: error``."""
        if self.hparams.on_bad_image == "error":
            raise DataConfigError(
                f"unreadable image '{path}' ({reason}); fix or delete it, or set "
                "data.on_bad_image=skip to leave unreadable images out."
            )
        if path in self.skipped:
            return
        self.skipped[path] = (reason, when)
        if when == "load":
            rank_zero_warn(f"skipped image '{path}' ({reason}); recorded in {self._record_name()}.")
        self._write_record()

    def _write_record(self) -> None:
        """Append the not yet written entries of ``self.skipped`` to the run directory's record.

        Scan-time entries are the same on every process, so only rank 0 writes them; images that
        fail at load time are written by the process that met them (rank N > 0 writes
        ``skipped_images.rankN.csv``).
        """
        if self.run_dir is None:
            return
        rank = 0 if self.trainer is None else self.trainer.global_rank
        pending = [
            (path, reason, when)
            for path, (reason, when) in self.skipped.items()
            if path not in self._written and (rank == 0 or when == "load")
        ]
        if not pending:
            return
        name = SKIPPED_FILE if rank == 0 else SKIPPED_FILE.replace(".csv", f".rank{rank}.csv")
        record = self.run_dir / name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        is_new = not record.exists()
        with open(record, "a", newline="") as file:
            writer = csv.writer(file)
            if is_new:
                writer.writerow(["path", "reason", "when"])
            writer.writerows(pending)
        self._written.update(path for path, _, _ in pending)

    def teardown(self, stage: str) -> None:
        at_load = sum(when == "load" for _, when in self.skipped.values())
        if self.skipped:
            rank_zero_info(
                f"{len(self.skipped)} image(s) left out ({at_load} at load time); listed in "
                f"{self._record_name()}."
            )
