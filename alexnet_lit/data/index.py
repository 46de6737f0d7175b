"""Which images of which class make up each split of a dataset root, scanned once and checked."""

import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from alexnet_lit.data.folders import (
    SplitScan,
    list_classes,
    not_images_note,
    scan_split,
    split_train_val,
)
from alexnet_lit.data.images import is_hidden
from alexnet_lit.data.samples import SampleList
from alexnet_lit.data.scan_cache import ScanCache
from alexnet_lit.data.skipped import SkippedImages
from alexnet_lit.errors import DataConfigError
from alexnet_lit.runs import printable


def class_counts(samples: Sequence[tuple[Path, int]], class_names: Sequence[str]) -> dict[str, int]:
    """Images per class of ``(path, class_index)`` samples, every class named (unlabelled
    samples, index -1, are not counted)."""
    counts = dict.fromkeys(class_names, 0)
    targets = getattr(samples, "targets", None)  # a SampleList's, without making each path
    for target in targets if targets is not None else (target for _, target in samples):
        if target >= 0:
            counts[class_names[target]] += 1
    return counts


def read_class_names(root: Path) -> list[str]:
    """The class folders of ``root/train``, sorted; at least two of them must hold files.

    Raises:
        DataConfigError: ``root`` or ``root/train`` is missing, or fewer than two class folders
            hold a file (a one-class "classifier" cannot be trained).
    """
    if not root.is_dir():
        raise DataConfigError(
            f"data.data_dir: folder '{root}' does not exist; pass --data.data_dir pointing at a "
            "folder with train/<class>/ and val/<class>/ inside."
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataConfigError(
            f"'{train_dir}' does not exist; put the training images in train/<class>/ under "
            "data.data_dir."
        )
    class_names = list_classes(train_dir)
    # A class folder without a single file cannot be a class; the scan later finds the folders
    # whose files are all unusable.
    with_files = [name for name in class_names if _holds_a_file(train_dir / name)]
    if len(with_files) < 2:
        found = [f"'{n}'" + ("" if n in with_files else " (empty)") for n in class_names]
        raise DataConfigError(
            f"'{train_dir}' needs at least two class folders with images and has "
            f"{len(with_files)} ({', '.join(found) or 'no class folder'}); put each class's "
            "images in its own subfolder, e.g. train/cat/ and train/dog/."
        )
    return class_names


class FolderIndex:
    """The usable images of each split, as ``(path, class_index)`` with the train class order.

    Each split folder is scanned once (:func:`~alexnet_lit.data.folders.scan_split`); what the
    scan leaves out goes to ``skipped``. Without ``val/``, a stratified, seeded share of each
    train class is held out for validation (:attr:`split_from_train`).

    The scans go through a :class:`~alexnet_lit.data.scan_cache.ScanCache`, so a folder whose
    files have not changed since the last run is listed, not opened. The samples are held as
    :class:`~alexnet_lit.data.samples.SampleList` arrays; the scans themselves are dropped once
    the samples are made.

    Args:
        root: The dataset root, holding ``train/`` and optionally ``val/`` and ``test/``.
        class_names: The classes in label order (the sorted folder names of ``train/``).
        skipped: Where images left out by the scan are recorded.
        val_split: The fraction of each train class held out when there is no ``val/``.
        seed: Seeds that split.
        rescan: Probe every file again, ignoring the scan cache (which is then rewritten).
    """

    def __init__(
        self,
        root: Path,
        class_names: Sequence[str],
        skipped: SkippedImages,
        val_split: float = 0.1,
        seed: int = 0,
        rescan: bool = False,
    ) -> None:
        self.root = root
        self.class_names = list(class_names)
        self.skipped = skipped
        self.val_split = val_split
        self.seed = seed
        self.rescan = rescan
        self.split_from_train = False  # val/ was split off train/
        self._scans: dict[str, SplitScan] = {}
        self._warm: dict[str, SplitScan] = {}  # scanned by warm_cache, not yet used
        self._samples: dict[str, SampleList] = {}

    def test_split(self) -> str:
        """``test`` where the dataset has a ``test/`` folder, else ``val``."""
        return "test" if (self.root / "test").is_dir() else "val"

    def labelled(self, split: str) -> SampleList:
        """``(path, class_index)`` of a split's usable images, in class order, each class's
        sorted; labels follow the train classes."""
        if split in ("train", "val") and "train" not in self._samples:
            self._train_and_val()
        if split not in self._samples:
            self._samples[split] = self._as_samples(self._checked_images(split))
        self._scans.clear()  # the samples hold what is needed, in a fraction of the memory
        return self._samples[split]

    def warm_cache(self, splits: Sequence[str]) -> None:
        """Scan ``splits`` (those that exist) into the scan cache: what ``prepare_data`` does
        once per machine, so that each other process's scan then opens no file (and, after a
        ``rescan``, reads what this one found). This process's own setup uses these scans."""
        for split in splits:
            folder = self.root / split
            if folder.is_dir():
                self._warm[split] = scan_split(
                    folder, cache=ScanCache(folder, read=not self.rescan)
                )
        self.rescan = False

    def _scan(self, split: str) -> SplitScan:
        if split in self._scans:
            return self._scans[split]
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DataConfigError(
                f"'{split_dir}' does not exist; put the {split} images in {split}/<class>/ "
                "under data.data_dir."
            )
        scan = self._warm.pop(split, None)
        if scan is None:
            scan = scan_split(split_dir, cache=ScanCache(split_dir, read=not self.rescan))
        self._scans[split] = scan
        scan.infos = {}  # the index needs the lists, not each file's header
        for path, reason in scan.unreadable:
            self.skipped.add(str(path), reason, "scan")
        if scan.unreadable:
            path, reason = scan.unreadable[0]
            rank_zero_warn(
                printable(
                    f"{split}/: {len(scan.unreadable)} unreadable image(s) left out before "
                    f"training, e.g. '{path}' ({reason}); listed in {self.skipped.where()}."
                )
            )
        if scan.not_images:
            rank_zero_warn(printable(f"{split}/: {not_images_note(scan.not_images)}."))
        if scan.hidden or scan.outside_classes:
            rank_zero_info(
                f"{split}/: ignored {len(scan.hidden)} hidden or system entries and "
                f"{len(scan.outside_classes)} file(s) outside class folders."
            )
        return scan

    def _train_and_val(self) -> None:
        train = self._scan("train").images
        empty = [name for name in self.class_names if not train.get(name)]
        if empty:
            names = ", ".join(f"'{name}'" for name in empty)
            plural = len(empty) > 1
            raise DataConfigError(
                f"train class{'es' if plural else ''} {names} in '{self.root / 'train'}' "
                f"ha{'ve' if plural else 's'} no usable image; add images or remove the "
                f"folder{'s' if plural else ''} (python scripts/check_data.py lists the problems)."
            )
        if (self.root / "val").is_dir():
            val = self._checked_images("val")
        else:
            train, val = split_train_val(train, self.val_split, self.seed, self.root)
            rank_zero_info(
                f"no '{self.root / 'val'}': holding out {self.val_split:g} of each train class "
                f"for validation (seed {self.seed})."
            )
            self.split_from_train = True
        self._samples["train"] = self._as_samples(train)
        self._samples["val"] = self._as_samples(val)

    def _checked_images(self, split: str) -> dict[str, list[str]]:
        split_dir = self.root / split
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
            rank_zero_warn(
                printable(f"'{split_dir}' has no images of train classes: {', '.join(missing)}.")
            )
        return images

    def _as_samples(self, images: dict[str, list[str]]) -> SampleList:
        pairs = (
            (path, index)
            for index, name in enumerate(self.class_names)
            for path in images.get(name, [])
        )
        return SampleList(pairs, self.root)


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` holds a file that is not hidden, at any depth (stops at the first)."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        if any(not is_hidden(name) for name in filenames):
            return True
    return False
