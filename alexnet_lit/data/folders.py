"""Dataset folders: which entries are classes and samples, the split scan, the train/val split.

The DataModule and the data doctor (``scripts/check_data.py``) both scan with :func:`scan_split`,
so they agree on which files are classes, samples, hidden entries, non-images and unreadable
images.
"""

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from alexnet_lit.data.images import (
    ImageInfo,
    Verdict,
    is_hidden,
    load_image,
    probe,
)
from alexnet_lit.errors import first_line

SPLITS = ("train", "val", "test")
# How much of a file the duplicate search compares before it reads the whole file.
HEAD_BYTES = 4096
# Folders with fewer files scan without a progress bar.
PROGRESS_MIN_FILES = 500


@dataclass
class SplitScan:
    """What one split folder (``train/``, ``val/``) holds.

    Attributes:
        root: The split folder.
        images: Class name -> usable images, sorted; a class with none maps to ``[]``.
        infos: Image path -> what its header says.
        unreadable: ``(path, reason)`` of images that cannot be used.
        not_images: ``(path, reason)`` of other files, ignored.
        hidden: Hidden and system entries that were ignored (not descended into).
        outside_classes: Files directly in the split folder, in no class folder; ignored.
    """

    root: Path
    images: dict[str, list[Path]] = field(default_factory=dict)
    infos: dict[Path, ImageInfo] = field(default_factory=dict)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    not_images: list[tuple[Path, str]] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    outside_classes: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.images.items()}


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split, without hidden and system folders."""
    return sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not is_hidden(entry.name)
    )


def walk_files(folder: Path, hidden: list[Path]) -> list[Path]:
    """Files under ``folder`` (sorted, recursively); hidden entries go to ``hidden`` instead."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        hidden += [Path(dirpath, d) for d in dirnames if is_hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for name in sorted(filenames):
            (hidden if is_hidden(name) else found).append(Path(dirpath, name))
    return found


@dataclass
class InputScan:
    """Files and folders to predict, sorted out by the training scan's rule (:func:`probe`).

    Attributes:
        paths: The files that get a row, in order: every image in the folders (recursively,
            sorted, hidden entries skipped), readable or not, and every file named directly,
            whatever it holds.
        unreadable: Those of ``paths`` that the scan found unusable, with the reason: their row's
            error.
        not_images: Files in the folders that are not images; ignored and counted.
    """

    paths: list[Path] = field(default_factory=list)
    unreadable: dict[Path, str] = field(default_factory=dict)
    not_images: list[tuple[Path, str]] = field(default_factory=list)


def scan_inputs(inputs: Iterable[str | Path]) -> InputScan:
    """Sort existing files and folders into the images to predict and the files to ignore.

    Images are recognised by content, exactly as training's scan does (:func:`scan_files`), so a
    GIF or a JPEG without an extension gets a row. A file named directly always gets one.
    """
    scan = InputScan()
    for item in map(Path, inputs):
        folder = item.is_dir()
        files = walk_files(item, []) if folder else [item]
        infos, unreadable, not_images = scan_files(files, desc=f"scanning {item.name}")
        problems = dict(unreadable) if folder else {**dict(unreadable), **dict(not_images)}
        scan.paths += [path for path in files if path in infos or path in problems]
        scan.unreadable.update(problems)
        if folder:
            scan.not_images += not_images
    return scan


def not_images_note(not_images: Sequence[tuple[Path, str]]) -> str:
    """The words (no full stop) that count ignored files that are not images, naming one."""
    return f"ignored {len(not_images)} file(s) that are not images, e.g. '{not_images[0][0]}'"


def list_images(folder: Path) -> list[Path]:
    """Usable images under ``folder`` (recursively, sorted), by content; hidden entries skipped."""
    infos, _, _ = scan_files(walk_files(Path(folder), []))
    return sorted(infos)


def digest(data: bytes) -> str:
    """The fingerprint duplicate searches compare: 128 bits of BLAKE2b."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def identical_files(
    files: Mapping[str, Sequence[Path]], across_splits: bool = False
) -> list[tuple[str, list[tuple[str, Path]]]]:
    """Groups of byte-identical files among the splits' ``files``, as ``(digest, [(split, path),
    ...])`` sorted by their first path; ``across_splits`` keeps only the groups that occur in
    more than one split (a leak that inflates validation accuracy).

    Identical files have equal sizes and equal first bytes, so a file is read whole only when
    another file of its size starts the same: a stat per file, the first 4 KiB of the few that
    share a size, and all of only the likely copies.
    """

    def kept(group: list[tuple[str, Path]]) -> bool:
        return len(group) > 1 and (not across_splits or len({split for split, _ in group}) > 1)

    def regroup(
        groups: Iterable[list[tuple[str, Path]]], key: Callable[[Path], object]
    ) -> dict[tuple[int, object], list[tuple[str, Path]]]:
        """Split each group by ``key``, keeping the groups that still count; groups never merge."""
        out: dict[tuple[int, object], list[tuple[str, Path]]] = {}
        for number, group in enumerate(groups):
            for split, path in group:
                try:
                    out.setdefault((number, key(path)), []).append((split, path))
                except OSError:
                    continue  # gone or unreadable since the scan: nothing to compare
        return {k: group for k, group in out.items() if kept(group)}

    def head(path: Path) -> str:
        with open(path, "rb") as file:
            return digest(file.read(HEAD_BYTES))

    everything = [(split, Path(path)) for split, paths in files.items() for path in paths]
    by_size = regroup([everything], lambda path: os.stat(path).st_size)
    by_head = regroup(by_size.values(), head)
    same = regroup(by_head.values(), lambda path: digest(path.read_bytes()))
    groups = [(key[1], sorted(group, key=lambda e: str(e[1]))) for key, group in same.items()]
    return sorted(groups, key=lambda g: str(g[1][0][1]))


def scan_files(
    files: Sequence[Path], decode: bool = False, desc: str = "scanning"
) -> tuple[dict[Path, ImageInfo], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Probe files: ``(infos, unreadable, not_images)``; a progress bar on many files.

    ``decode`` also decodes every image that passes the cheap checks (slow; finds the rest).
    """
    infos, unreadable, not_images = {}, [], []
    show = len(files) >= PROGRESS_MIN_FILES
    for path in tqdm(files, desc=desc, unit="file", disable=None if show else True, leave=False):
        verdict = probe(path)
        if verdict.info is not None and decode:
            try:
                load_image(path)
            except Exception as err:  # whatever Pillow raises for broken pixel data
                reason = f"fails to decode ({type(err).__name__}: {first_line(err)})"
                verdict = Verdict(problem="unreadable", reason=reason)
        if verdict.info is not None:
            infos[path] = verdict.info
        elif verdict.problem == "unreadable":
            unreadable.append((path, verdict.reason))
        else:
            not_images.append((path, verdict.reason))
    return infos, unreadable, not_images


def scan_split(split_dir: Path, decode: bool = False) -> SplitScan:
    """Scan ``split_dir/<class>/**`` with cheap checks (headers, not pixels).

    Args:
        split_dir: A split folder such as ``dataset/train``.
        decode: Also decode each image (slow); see :func:`scan_files`.
    """
    scan = SplitScan(Path(split_dir))
    files_by_class: dict[str, list[Path]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        path = Path(entry.path)
        if is_hidden(entry.name):
            scan.hidden.append(path)
        elif entry.is_dir():
            files_by_class[entry.name] = walk_files(path, scan.hidden)
        else:
            scan.outside_classes.append(path)
    files = [path for paths in files_by_class.values() for path in paths]
    infos, scan.unreadable, scan.not_images = scan_files(
        files, decode, desc=f"scanning {split_dir.name}/"
    )
    scan.infos = infos
    scan.images = {
        name: [path for path in paths if path in infos] for name, paths in files_by_class.items()
    }
    return scan


def split_train_val(
    images: Mapping[str, Sequence[Path]], val_split: float, seed: int, root: Path
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """A stratified, seeded split of each class's images into train and val.

    The order within a class is a hash of the seed and the path relative to ``root``, so the
    split depends only on the file list and the seed: every process of a distributed run, and
    every later run on the same files, gets the same split. Each class with at least two images
    gives at least one to val and keeps at least one for train.
    """
    train, val = {}, {}
    for name, paths in images.items():

        def key(path: Path) -> str:
            relative = path.relative_to(root).as_posix()
            # surrogateescape: a name that is not valid UTF-8 hashes as its bytes, not an error
            return hashlib.sha256(
                f"{seed}:{relative}".encode("utf-8", "surrogateescape")
            ).hexdigest()

        ordered = sorted(paths, key=key)
        n_val = round(len(ordered) * val_split)
        if val_split > 0 and len(ordered) >= 2:
            n_val = min(max(n_val, 1), len(ordered) - 1)
        val[name] = sorted(ordered[:n_val])
        train[name] = sorted(ordered[n_val:])
    return train, val


def imbalance_ratio(counts: Mapping[str, int]) -> float | None:
    """Largest class count / smallest; None when a class is empty or there are none."""
    values = list(counts.values())
    if not values or min(values) == 0:
        return None
    return max(values) / min(values)


def imbalance_text(counts: Mapping[str, int]) -> str:
    """The imbalance ratio as people read it, ``4.00:1``, or why there is none."""
    ratio = imbalance_ratio(counts)
    return "n/a (a class without images)" if ratio is None else f"{ratio:.2f}:1"


def class_count_table(counts: Mapping[str, Mapping[str, int]]) -> str:
    """A small text table of images per class (rows) and split (columns)."""
    splits = list(counts)
    classes = sorted({name for split in counts.values() for name in split})
    width = max([len("class"), *map(len, classes)])
    lines = ["  ".join([f"{'class':<{width}}", *(f"{s:>7}" for s in splits)])]
    for name in classes:
        cells = [f"{counts[s].get(name, 0):>7}" for s in splits]
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)
