"""The ImageFolder DataModule: roots, splits, presets, loaders, worker counts and the class list."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from alexnet_lit.data.dali import DALILoader, DALIPreset, dali_refuses, require_dali
from alexnet_lit.data.datasets import ImageListDataset, LoadedBatch, SkippingCollate
from alexnet_lit.data.demo import DEMO_CLASSES, DEMO_PRESET, demo_dir, write_digits_demo
from alexnet_lit.data.folders import (
    class_count_table,
    imbalance_text,
    not_images_note,
    read_class_names,
    scan_inputs,
    usable_cpus,
)
from alexnet_lit.data.index import FolderIndex, class_counts
from alexnet_lit.data.presets import EvalPreset, Preset, TrainPreset, random_erasing
from alexnet_lit.data.samplers import BalancedSampler, ShuffledSampler, UnpaddedDistributedSampler
from alexnet_lit.data.skipped import SkippedImages
from alexnet_lit.errors import DataConfigError
from alexnet_lit.preprocessing import (
    IMAGE_SIZE,
    MEAN,
    MIN_IMAGE_SIZE,
    STD,
    normalize,
    preprocessing_record,
)
from alexnet_lit.runs import open_text, printable, run_dir

# Augmentation preset where image_size, crop_scale or hflip are left unset (None) on your data.
TUTORIAL_PRESET = {"image_size": IMAGE_SIZE, "crop_scale": (0.08, 1.0), "hflip": True}
# The train/val split made from train/ when there is no val/, saved into the run folder.
SPLIT_FILES = {"train": "split_train.txt", "val": "split_val.txt"}


def default_num_workers(processes: int = 1) -> int:
    """Loader workers for each of ``processes`` training processes on this machine.

    The CPUs this process may use (its affinity, not the machine's count) are shared out, one
    kept for each training process, at most 16 each: every worker costs memory and start-up
    time, and a 16-vCPU GPU machine was still loader-bound with 16 (docs/speed.md).
    """
    return max(0, min(16, usable_cpus() // max(1, processes) - 1))


def shuffle_seed(processes: int = 1) -> int:
    """The seed of training's shuffle and augmentations: ``seed_everything``'s, which it puts in
    ``PL_GLOBAL_SEED`` (Lightning's own DistributedSampler reads it there); without one, this
    process's torch seed, or 0 with several processes, which must all draw the same order."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        return int(seed)
    return torch.initial_seed() if processes == 1 else 0


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
        image_size: Side of the square network input, at least 65. None: the tutorial's 224
            for your data, 96 for the demo's 8x8 digits.
        in_channels: 3 for RGB, 1 to train on grayscale.
        mean: Per-channel mean the network's input is normalized with, one value per channel.
            None: the tutorial's 0.5, or what ``model.weights`` were trained with (the CLI
            fills it in from them).
        std: Per-channel standard deviation, as ``mean``; None: the tutorial's 0.5.
        crop_scale: Area range of the training RandomResizedCrop. None: the tutorial's
            (0.08, 1.0) for your data, (0.5, 1.0) for the demo.
        hflip: Random horizontal flips in training. None: on for your data (the tutorial's),
            off for the demo's digits.
        predict_dir: Folder of images (searched recursively, recognised by content as in
            training; unreadable ones get an error row) for the ``predict`` subcommand;
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
        backend: ``"pil"`` decodes in the loader workers (every machine); ``"dali"`` reads the
            same file lists through NVIDIA DALI, which decodes, crops, resizes, flips and
            normalizes on the GPU (``pip install -e '.[dali]'``; the tutorial preset only).
            Prediction always uses the PIL path.
        rescan: Probe every file again instead of trusting the scan cache, which keeps each
            file's verdict while its size and modification time stay the same (see
            :mod:`alexnet_lit.data.scan_cache`); the cache is rewritten.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: tuple[float, float] | None = None,
        hflip: bool | None = None,
        predict_dir: str | Path | None = None,
        val_split: float = 0.1,
        seed: int = 0,
        on_bad_image: Literal["skip", "error"] = "skip",
        balance: Literal["none", "loss", "sampler"] = "none",
        augment: Literal["tutorial", "strong"] = "tutorial",
        backend: Literal["pil", "dali"] = "pil",
        rescan: bool = False,
    ) -> None:
        super().__init__()
        # Checkpoints hold these hyperparameters; as str, not Path, they load with weights_only.
        data_dir = None if data_dir is None else str(data_dir)
        predict_dir = None if predict_dir is None else str(predict_dir)
        self.save_hyperparameters()
        self.is_demo = data_dir is None
        self.data_dir = demo_dir() if self.is_demo else Path(data_dir).expanduser()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.predict_dir = None if predict_dir is None else Path(predict_dir).expanduser()
        if batch_size < 1:
            raise DataConfigError(f"data.batch_size must be at least 1, got {batch_size}.")
        if num_workers is not None and num_workers < 0:
            raise DataConfigError(
                f"data.num_workers must be 0 or more (0 loads in the training process), got "
                f"{num_workers}."
            )
        if image_size is not None and image_size < MIN_IMAGE_SIZE:
            raise DataConfigError(
                f"data.image_size must be at least {MIN_IMAGE_SIZE}, the smallest input "
                f"AlexNet's convolutions and pools take, got {image_size}."
            )
        if crop_scale is not None and (
            len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0
        ):
            raise DataConfigError(
                f"data.crop_scale must be two area fractions [min, max] with "
                f"0 < min <= max <= 1, got {list(crop_scale)}."
            )
        if in_channels not in (1, 3):
            raise DataConfigError(f"data.in_channels must be 1 or 3, got {in_channels}.")
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != in_channels:
                raise DataConfigError(
                    f"data.{key} has {len(values)} value(s) but data.in_channels is "
                    f"{in_channels}; give one per channel."
                )
        if std is not None and min(std) <= 0:
            raise DataConfigError(f"data.std must be positive, got {list(std)}.")
        if not 0.0 < val_split < 1.0:
            raise DataConfigError(f"data.val_split must be between 0 and 1, got {val_split}.")
        if on_bad_image not in ("skip", "error"):
            raise DataConfigError(f"data.on_bad_image must be skip or error, got {on_bad_image}.")
        if balance not in ("none", "loss", "sampler"):
            raise DataConfigError(f"data.balance must be none, loss or sampler, got {balance}.")
        if backend not in ("pil", "dali"):
            raise DataConfigError(f"data.backend must be pil or dali, got {backend}.")
        if backend == "dali":
            require_dali()
            for key, value, default in (
                ("augment", augment, "tutorial"),
                ("balance", balance, "none"),
            ):
                if value != default:
                    raise DataConfigError(
                        f"data.{key}: {value} runs on the pil backend only; set data.backend: pil "
                        f"or data.{key}: {default}."
                    )
        # Read now, not in setup(): the CLI links the class list into the model at instantiation.
        self.class_names = DEMO_CLASSES if self.is_demo else read_class_names(self.data_dir)
        preset = DEMO_PRESET if self.is_demo else TUTORIAL_PRESET
        self.image_size = preset["image_size"] if image_size is None else image_size
        self.crop_scale = preset["crop_scale"] if crop_scale is None else tuple(crop_scale)
        self.hflip = preset["hflip"] if hflip is None else hflip
        self.preprocessing = preprocessing_record(
            self.image_size, in_channels, mean or MEAN, std or STD
        )
        self.datasets: dict[str, ImageListDataset] = {}
        self.skipped = SkippedImages(on_bad_image)
        self.index = FolderIndex(
            self.data_dir,
            self.class_names,
            self.skipped,
            val_split,
            seed,
            rescan,
            refuse=dali_refuses if backend == "dali" else None,
        )
        self.run_dir: Path | None = None
        self._chosen: dict[str, list[tuple[Path, int]]] = {}  # see use_samples

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_weights(self) -> list[float] | None:
        """Cross-entropy class weights for ``balance: loss`` (linked into the model), else None."""
        if self.hparams.balance != "loss":
            return None
        counts = list(class_counts(self.samples("train"), self.class_names).values())
        total = sum(counts)
        return [total / (self.num_classes * count) for count in counts]

    def use_samples(
        self,
        train: Sequence[tuple[Path, int]] | None = None,
        val: Sequence[tuple[Path, int]] | None = None,
    ) -> None:
        """Train (and validate) on these ``(path, class_index)`` samples instead of the folders'
        splits, e.g. one fold of a cross-validation or a subset of a learning curve. Call it
        before the trainer runs; None keeps the folder's split."""
        for split, samples in (("train", train), ("val", val)):
            if samples is not None:
                self._chosen[split] = list(samples)

    def samples(self, split: str) -> list[tuple[Path, int]]:
        """``(path, class_index)`` of a split's usable images (or those given to use_samples)."""
        return self._chosen.get(split) or self.index.labelled(split)

    def prepare_data(self) -> None:
        # Lightning runs this once per machine (local rank 0) while the other processes wait:
        # the one scan of the machine, whose result each process's setup reads from the cache.
        if self.is_demo and not self.data_dir.is_dir():
            write_digits_demo(self.data_dir)
        stage = self.trainer.state.fn if self.trainer is not None else None
        self.index.warm_cache(self._splits_for(None if stage is None else stage.value))

    def _splits_for(self, stage: str | None) -> tuple[str, ...]:
        """The split folders a stage scans (``fit`` when unknown). Validation scans train/ too:
        its classes are checked, and without val/ it is split off train/."""
        if stage == "test" and (self.data_dir / "test").is_dir():
            return ("test",)
        if stage == "predict" and self.predict_dir is not None:
            return ()
        return ("train", "val")

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.index.rescan = False  # prepare_data has rescanned on this machine
            folder = run_dir(self.trainer)  # every process runs setup: resolved here, once a stage
            if self.run_dir is None:
                self.run_dir = folder
                self.skipped.start(folder, self.trainer.global_rank)
        if self.hparams.num_workers is None and self.trainer is not None:
            # With several processes per machine (DDP), each gets its share of the CPUs.
            self.num_workers = default_num_workers(self.trainer.num_devices)
        if stage == "fit":
            self.datasets["train"] = self._dataset("train", self.train_preset())
            self._report_class_counts()
        if stage in ("fit", "validate"):
            self.datasets["val"] = self._dataset("val", self.eval_preset())
        if stage == "test":
            # A held-out test/ split is optional; without one, test reports on val.
            split = self.index.test_split()
            note = "" if split == "test" else " (there is no test/ folder)"
            rank_zero_info(f"test: evaluating {self.data_dir / split}{note}")
            self.datasets["test"] = self._dataset(split, self.eval_preset())
        if stage == "predict":
            self.datasets["predict"] = self._predict_dataset()
        self._save_split_lists()

    def train_preset(self) -> TrainPreset:
        """The training preset: random crop, flip (and, for ``augment: strong``, more)."""
        return TrainPreset(
            self.image_size,
            self.hparams.in_channels,
            crop_scale=self.crop_scale,
            hflip=self.hflip,
            augment=self.hparams.augment,
        )

    def eval_preset(self) -> EvalPreset:
        """The deterministic preset of validation, test and prediction; the one checkpoints
        record (``preprocessing``)."""
        return EvalPreset(**self.preprocessing)

    def _dataset(self, split: str, preset: Preset) -> ImageListDataset:
        return ImageListDataset(self.samples(split), preset.read)

    def _save_split_lists(self) -> None:
        """Write the train/val split made from train/ into the run directory (rank 0, once)."""
        if (
            not self.index.split_from_train
            or self.run_dir is None
            or not self.trainer.is_global_zero
        ):
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "val"):
            with open_text(self.run_dir / SPLIT_FILES[split]) as file:
                for path, _ in self.index.labelled(split):  # by class, as the split made them
                    file.write(f"{path.relative_to(self.data_dir).as_posix()}\n")

    def _report_class_counts(self) -> None:
        counts = {
            split: class_counts(self.samples(split), self.class_names) for split in ("train", "val")
        }
        rank_zero_info(
            f"images per class (train imbalance {imbalance_text(counts['train'])}, balance: "
            f"{self.hparams.balance}):\n{class_count_table(counts)}"
        )

    def _predict_dataset(self) -> ImageListDataset:
        if self.predict_dir is None:
            return self._dataset("val", self.eval_preset())
        if not self.predict_dir.exists():
            raise DataConfigError(
                f"data.predict_dir: '{self.predict_dir}' does not exist; pass an image folder."
            )
        # Images by content, as in training; an unreadable one still gets its error row.
        found = scan_inputs([self.predict_dir])
        ignored = f" ({not_images_note(found.not_images)})" if found.not_images else ""
        if not found.paths:
            raise DataConfigError(
                f"data.predict_dir: '{self.predict_dir}' holds no images{ignored}."
            )
        if found.not_images:
            rank_zero_warn(printable(f"data.predict_dir: {not_images_note(found.not_images)}."))
        for path, reason in found.unreadable.items():
            self.skipped.add(str(path), reason, "scan")
        return ImageListDataset(
            [(path, -1) for path in found.paths],
            self.eval_preset().read,
            unreadable=found.unreadable,
        )

    def train_dataloader(self) -> DataLoader | DALILoader:
        if self.hparams.backend == "dali":
            return self._dali_loader("train")
        dataset = self.datasets["train"]
        trainer = self.trainer
        world_size = 1 if trainer is None else trainer.world_size
        rank = 0 if trainer is None else trainer.global_rank
        if self.hparams.balance == "sampler":
            sampler = BalancedSampler(dataset.targets, world_size, rank, self.hparams.seed)
        else:
            sampler = ShuffledSampler(len(dataset), world_size, rank, shuffle_seed(world_size))
        return self._loader(dataset, sampler=sampler)

    def val_dataloader(self) -> DataLoader | DALILoader:
        if self.hparams.backend == "dali":
            return self._dali_loader("val")
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader | DALILoader:
        if self.hparams.backend == "dali":
            return self._dali_loader("test")
        return self._loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["predict"])

    def _loader(self, dataset: Dataset, sampler=None) -> DataLoader:
        on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        distributed = self.trainer is not None and self.trainer.world_size > 1
        if sampler is None and distributed:
            # Evaluation under DDP: each image exactly once, so metrics are exact. (Training's
            # samplers are DistributedSamplers of its own; Lightning calls set_epoch on them.)
            self._check_evaluation_split(len(dataset))
            world_size = self.trainer.world_size
            sampler = UnpaddedDistributedSampler(dataset, world_size, self.trainer.global_rank)
        shape = (self.image_size, self.image_size, self.hparams.in_channels)  # a preset's HWC
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # The workers' base seed comes from a generator of the loader's own, not from the
            # process's stream, which a resumed fit must continue as the uninterrupted one does:
            # a loader is made at another point of a resumed fit. Training's random crops and
            # flips come with the sampler's indices instead (alexnet_lit.data.samplers).
            generator=torch.Generator().manual_seed(0),
            pin_memory=on_cuda,
            collate_fn=SkippingCollate(shape),
        )

    def _check_evaluation_split(self, images: int) -> None:
        """Every process scores at least one evaluation image (DDP's collectives need it)."""
        world_size = 1 if self.trainer is None else self.trainer.world_size
        if images < world_size:
            raise DataConfigError(
                f"{images} evaluation images cannot be split over {world_size} "
                "processes; add images or lower trainer.devices / trainer.num_nodes."
            )

    def _dali_loader(self, stage: str) -> DALILoader:
        """The same images and labels as the PIL path's dataset, through a DALI pipeline."""
        trainer = self.trainer
        device = torch.device("cpu") if trainer is None else trainer.strategy.root_device
        train = stage == "train"
        if not train:
            self._check_evaluation_split(len(self.datasets[stage]))
        preset = DALIPreset(
            image_size=self.image_size,
            resize_size=self.preprocessing["resize_size"],
            in_channels=self.hparams.in_channels,
            mean=tuple(self.preprocessing["mean"]),
            std=tuple(self.preprocessing["std"]),
            train=train,
            crop_scale=tuple(self.crop_scale),
            hflip=bool(self.hflip),
        )
        return DALILoader(
            self.datasets[stage].samples,
            preset,
            self.hparams.batch_size,
            rank=0 if trainer is None else trainer.global_rank,
            world_size=1 if trainer is None else trainer.world_size,
            device_id=(device.index or 0) if device.type == "cuda" else None,
            num_threads=max(1, self.num_workers),
            seed=self.hparams.seed,
            on_bad_image=lambda path, reason: self.skipped.add(path, reason, "load"),
            epoch=None if trainer is None or not train else lambda: trainer.current_epoch,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Record the images the workers could not load, then hand on ``(images, targets)``;
        ``predict`` gets the whole :class:`LoadedBatch`, whose indices and records name each
        image's row."""
        if not isinstance(batch, LoadedBatch):
            return batch
        for bad in batch.skipped:
            self.skipped.add(bad.path, bad.reason, "load")  # raises with on_bad_image: error
        if self.trainer is not None and self.trainer.predicting:
            return batch
        return batch.images, batch.targets

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """On the training device, once per batch: the uint8 images become the normalized
        float input, channels-last (and, with ``augment: strong``, each training image gets a
        random erased rectangle)."""
        images = batch[0]
        if images.dtype != torch.uint8:  # already the network's input
            return batch
        images = normalize(images, self.preprocessing["mean"], self.preprocessing["std"])
        if self.hparams.augment == "strong" and self.trainer is not None and self.trainer.training:
            images = random_erasing(images)
        if isinstance(batch, LoadedBatch):
            return batch._replace(images=images)
        return images, batch[1]

    def teardown(self, stage: str) -> None:
        if self.skipped:
            at_load = sum(when == "load" for _, when in self.skipped.entries.values())
            rank_zero_info(
                f"{len(self.skipped)} image(s) left out ({at_load} at load time); listed in "
                f"{self.skipped.where()}."
            )
