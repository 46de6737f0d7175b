"""Which images of which class make up each split of a dataset root, scanned once and checked."""

from collections.abc import Callable, Sequence
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from alexnet_lit.data.folders import (
    SplitScan,
    check_split,
    not_images_note,
    scan_split,
    split_train_val,
)
from alexnet_lit.data.images import ImageInfo
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
        refuse: For a loader that cannot read every image the scan accepts (DALI): given an
            image's path and header, the reason it cannot, or None. Refused images are left
            out and recorded as unreadable at the scan.
    """

    def __init__(
        self,
        root: Path,
        class_names: Sequence[str],
        skipped: SkippedImages,
        val_split: float = 0.1,
        seed: int = 0,
        rescan: bool = False,
        refuse: Callable[[str, ImageInfo], str | None] | None = None,
    ) -> None:
        self.root = root
        self.refuse = refuse
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
        for done in self._samples:
            self._warm.pop(done, None)
        return self._samples[split]

    def warm_cache(self, splits: Sequence[str]) -> None:
        """Scan ``splits`` (those that exist) into the scan cache: what ``prepare_data`` does
        once per machine, so that each other process's scan then opens no file (and, after a
        ``rescan``, reads what this one found). This process's own setup uses these scans."""
        for split in splits:
            folder = self.root / split
            if folder.is_dir() and split not in self._samples:  # not scanned here already
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
        if self.refuse is not None:
            refused = {path: self.refuse(path, info) for path, info in scan.infos.items()}
            refused = {path: reason for path, reason in refused.items() if reason}
            scan.images = {
                name: [path for path in paths if path not in refused]
                for name, paths in scan.images.items()
            }
            scan.unreadable += list(refused.items())
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
        images = self._scan(split).images
        missing = check_split(self.root / split, images, self.class_names)
        if missing:
            rank_zero_warn(
                printable(
                    f"'{self.root / split}' has no images of train classes: {', '.join(missing)}."
                )
            )
        return images

    def _as_samples(self, images: dict[str, list[str]]) -> SampleList:
        pairs = (
            (path, index)
            for index, name in enumerate(self.class_names)
            for path in images.get(name, [])
        )
        return SampleList(pairs, self.root)
