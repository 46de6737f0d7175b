"""Dataset folders: scan a split, split train/ when there is no val/, and the data doctor's report.

The DataModule and ``scripts/check_data.py`` both scan with :func:`scan_split`, so they agree on
which files are classes, samples, hidden entries, non-images and unreadable images.
"""

import hashlib
import json
import os
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alexnet_lit.images import (
    ImageInfo,
    Verdict,
    has_image_extension,
    is_hidden,
    load_image,
    probe,
    sniff_format,
)

SPLITS = ("train", "val", "test")
# Folders with fewer files scan without a progress bar.
PROGRESS_MIN_FILES = 500
# An imbalance ratio (largest class / smallest class) above this gets a warning.
IMBALANCE_WARNING = 5.0


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
        hashes: Image path -> hash of its bytes (only when scanned with ``hash_files``).
    """

    root: Path
    images: dict[str, list[Path]] = field(default_factory=dict)
    infos: dict[Path, ImageInfo] = field(default_factory=dict)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    not_images: list[tuple[Path, str]] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    outside_classes: list[Path] = field(default_factory=list)
    hashes: dict[Path, str] = field(default_factory=dict)

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


def image_files(folder: Path) -> list[Path]:
    """Files with an image extension under ``folder`` (recursively, sorted), hidden ones skipped.

    Chosen by name, not content: a broken image is listed, so that it gets a row with its error.
    """
    return [path for path in walk_files(Path(folder), []) if has_image_extension(path)]


def scan_files(
    files: Sequence[Path], hash_files: bool = False, decode: bool = False, desc: str = "scanning"
) -> tuple[dict[Path, ImageInfo], list[tuple[Path, str]], list[tuple[Path, str]], dict]:
    """Probe files: ``(infos, unreadable, not_images, hashes)``; a progress bar on many files.

    ``decode`` also decodes every image that passes the cheap checks (slow; finds the rest).
    """
    infos, unreadable, not_images, hashes = {}, [], [], {}
    show = len(files) >= PROGRESS_MIN_FILES
    for path in tqdm(files, desc=desc, unit="file", disable=None if show else True, leave=False):
        data = None
        if hash_files:
            try:
                with open(path, "rb") as file:
                    if sniff_format(file.read(16)) is not None:
                        file.seek(0)
                        data = file.read()
            except OSError:
                pass  # probe() reports it
        verdict = probe(path, data)
        if verdict.info is not None and decode:
            try:
                load_image(path)
            except Exception as err:  # whatever Pillow raises for broken pixel data
                lines = str(err).strip().splitlines()
                reason = f"fails to decode ({type(err).__name__}: {lines[0] if lines else ''})"
                verdict = Verdict(problem="unreadable", reason=reason)
        if verdict.info is not None:
            infos[path] = verdict.info
            if data is not None:
                hashes[path] = hashlib.blake2b(data, digest_size=16).hexdigest()
        elif verdict.problem == "unreadable":
            unreadable.append((path, verdict.reason))
        else:
            not_images.append((path, verdict.reason))
    return infos, unreadable, not_images, hashes


def scan_split(split_dir: Path, hash_files: bool = False, decode: bool = False) -> SplitScan:
    """Scan ``split_dir/<class>/**`` with cheap checks (headers, not pixels).

    Args:
        split_dir: A split folder such as ``dataset/train``.
        hash_files: Also hash each image's bytes (for the doctor's duplicate search).
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
    infos, scan.unreadable, scan.not_images, scan.hashes = scan_files(
        files, hash_files, decode, desc=f"scanning {split_dir.name}/"
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
            return hashlib.sha256(f"{seed}:{relative}".encode()).hexdigest()

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


# The data doctor ------------------------------------------------------------------------------


def diagnose(root: str | Path, decode: bool = False) -> dict[str, Any]:
    """Scan a dataset folder and return the doctor's report as plain data (JSON-ready).

    The checks read headers and hash bytes; ``decode`` also decodes every image, which finds
    the few broken files whose header and end marker look fine (and is much slower).

    ``errors`` make the dataset unusable as is (exit code 1 in ``check_data.py``): no train
    classes, a train class without a usable image, val/test classes not in train, unreadable
    images, and identical images shared between train and val/test (a leak that inflates
    validation accuracy). ``warnings`` are worth a look but do not stop training.
    """
    root = Path(root)
    report: dict[str, Any] = {"path": str(root), "splits": {}, "errors": [], "warnings": []}
    errors, warnings = report["errors"], report["warnings"]
    scans = {
        s: scan_split(root / s, hash_files=True, decode=decode)
        for s in SPLITS
        if (root / s).is_dir()
    }
    if "train" not in scans:
        errors.append(f"'{root / 'train'}' does not exist; put training images in train/<class>/.")
    for split, scan in scans.items():
        report["splits"][split] = _split_summary(scan)
    report["unreadable"] = [
        {"path": str(p), "reason": r} for scan in scans.values() for p, r in scan.unreadable
    ]
    report["not_images"] = [
        {"path": str(p), "reason": r} for scan in scans.values() for p, r in scan.not_images
    ]
    report["hidden"] = [str(p) for scan in scans.values() for p in scan.hidden]
    report["outside_classes"] = [str(p) for scan in scans.values() for p in scan.outside_classes]
    report["empty_classes"] = {
        split: sorted(name for name, paths in scan.images.items() if not paths)
        for split, scan in scans.items()
    }
    across, within = _duplicates(scans)
    report["duplicates_across_splits"] = across
    report["duplicates_within_split"] = within

    train_classes = set(scans["train"].images) if "train" in scans else set()
    if "train" in scans and not train_classes:
        errors.append(f"'{root / 'train'}' has no class folders.")
    for name in report["empty_classes"].get("train", []):
        errors.append(f"train class '{name}' has no usable image.")
    for split in ("val", "test"):
        if split not in scans or not train_classes:
            continue
        unknown = sorted(set(scans[split].images) - train_classes)
        if unknown:
            errors.append(f"{split}/ has classes that train/ does not: {', '.join(unknown)}.")
        missing = sorted(train_classes - set(scans[split].images))
        if missing:
            warnings.append(f"{split}/ has no folder for train classes: {', '.join(missing)}.")
    if report["unreadable"]:
        errors.append(f"{len(report['unreadable'])} unreadable image(s) (listed above).")
    if across:
        n = sum(len(group["paths"]) for group in across)
        errors.append(
            f"{len(across)} image(s) appear in more than one split ({n} files): "
            "validation accuracy would be inflated."
        )
    if "train" in scans and "val" not in scans:
        warnings.append("no val/ folder: training holds out data.val_split of train/ instead.")
    for split, summary in report["splits"].items():
        ratio = summary["imbalance_ratio"]
        if ratio is not None and ratio > IMBALANCE_WARNING:
            warnings.append(
                f"{split}/ is imbalanced ({ratio:.1f}:1); consider data.balance=loss or sampler."
            )
    if report["not_images"]:
        warnings.append(f"{len(report['not_images'])} file(s) that are not images are ignored.")
    if report["outside_classes"]:
        warnings.append(
            f"{len(report['outside_classes'])} file(s) outside class folders are ignored."
        )
    for split, groups in within.items():
        if groups:
            warnings.append(f"{split}/ has {len(groups)} group(s) of identical images.")
    return report


def _split_summary(scan: SplitScan) -> dict[str, Any]:
    counts = scan.counts()
    infos = list(scan.infos.values())

    def stats(values: list[int]) -> dict[str, float] | None:
        if not values:
            return None
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "classes": counts,
        "images": sum(counts.values()),
        "imbalance_ratio": imbalance_ratio(counts),
        "width": stats([info.width for info in infos]),
        "height": stats([info.height for info in infos]),
        "modes": dict(Counter(info.mode for info in infos).most_common()),
        "formats": dict(Counter(info.format for info in infos).most_common()),
    }


def _duplicates(scans: Mapping[str, SplitScan]) -> tuple[list[dict], dict[str, list[list[str]]]]:
    by_hash: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for split, scan in scans.items():
        for path, digest in scan.hashes.items():
            by_hash[digest].append((split, path))
    across, within = [], {split: [] for split in scans}
    for digest, entries in sorted(by_hash.items(), key=lambda item: str(item[1][0][1])):
        if len(entries) < 2:
            continue
        splits = {split for split, _ in entries}
        if len(splits) > 1:
            across.append({"hash": digest, "paths": [str(path) for _, path in entries]})
        else:
            within[entries[0][0]].append([str(path) for _, path in entries])
    return across, within


def format_report(report: Mapping[str, Any]) -> str:
    """The doctor's report as readable text."""
    lines = [f"Dataset: {report['path']}"]
    splits = report["splits"]
    if splits:
        lines += ["", class_count_table({s: v["classes"] for s, v in splits.items()})]
        for split, summary in splits.items():
            ratio = summary["imbalance_ratio"]
            ratio_text = "n/a (an empty class)" if ratio is None else f"{ratio:.2f}:1"
            lines.append("")
            lines.append(
                f"{split}/: {summary['images']} images, {len(summary['classes'])} classes, "
                f"imbalance {ratio_text}"
            )
            if summary["width"]:
                w, h = summary["width"], summary["height"]
                lines.append(
                    f"  size (w x h) min {w['min']}x{h['min']}, median "
                    f"{w['median']:g}x{h['median']:g}, max {w['max']}x{h['max']}"
                )
                modes = ", ".join(f"{m} {n}" for m, n in summary["modes"].items())
                lines.append(f"  modes: {modes}")
    sections = [
        ("Unreadable images", [f"{d['path']}: {d['reason']}" for d in report["unreadable"]]),
        ("Not images (ignored)", [f"{d['path']}: {d['reason']}" for d in report["not_images"]]),
        ("Hidden and system entries (ignored)", report["hidden"]),
        ("Files outside class folders (ignored)", report["outside_classes"]),
        (
            "Empty classes",
            [f"{s}/{n}" for s, names in report["empty_classes"].items() for n in names],
        ),
        (
            "Identical images in more than one split",
            [" = ".join(group["paths"]) for group in report["duplicates_across_splits"]],
        ),
        (
            "Identical images within a split",
            [
                " = ".join(group)
                for groups in report["duplicates_within_split"].values()
                for group in groups
            ],
        ),
    ]
    for title, items in sections:
        if items:
            lines += ["", f"{title} ({len(items)}):", *(f"  {item}" for item in items)]
    lines.append("")
    for error in report["errors"]:
        lines.append(f"ERROR: {error}")
    for warning in report["warnings"]:
        lines.append(f"warning: {warning}")
    lines.append("Verdict: " + ("NOT usable as is." if report["errors"] else "usable as is."))
    return "\n".join(lines)


def check_data_main(argv: Sequence[str] | None = None) -> int:
    """``check_data.py PATH [--json]``: 0 usable as is, 1 errors found, 2 bad path."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Scan an ImageFolder dataset (train/, val/, test/) and report its problems."
    )
    parser.add_argument("path", type=Path, help="the dataset root, holding train/<class>/...")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--decode", action="store_true", help="also decode every image (slower, finds all)"
    )
    args = parser.parse_args(argv)
    if not args.path.is_dir():
        print(f"error: '{args.path}' is not a folder; pass a dataset root.", file=sys.stderr)
        return 2
    report = diagnose(args.path, decode=args.decode)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["errors"] else 0
