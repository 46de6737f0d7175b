"""The data doctor: scan a dataset folder and report what would hurt training.

``scripts/check_data.py`` is its command line. It applies the rules of
:mod:`alexnet_lit.data.folders` and :mod:`alexnet_lit.data.images`, the same ones training uses.
"""

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from alexnet_lit.data.folders import (
    SPLITS,
    SplitScan,
    check_split,
    class_count_table,
    identical_files,
    imbalance_ratio,
    imbalance_text,
    read_class_names,
    scan_split,
)
from alexnet_lit.data.scan_cache import ScanCache
from alexnet_lit.errors import DataConfigError, run_main
from alexnet_lit.runs import printable

# An imbalance ratio (largest class / smallest class) above this gets a warning.
IMBALANCE_WARNING = 5.0


def diagnose(root: str | Path, decode: bool = False, rescan: bool = False) -> dict[str, Any]:
    """Scan a dataset folder and return the doctor's report as plain data (JSON-ready).

    The checks read headers, and compare the bytes of files of equal size; ``decode`` also
    decodes every image, which finds the few broken files whose header and end marker look fine
    (and is much slower).

    ``errors`` make the dataset unusable as is (exit code 1 in ``check_data.py``): no train
    classes, a train class without a usable image, val/test classes not in train, unreadable
    images, and identical images shared between train and val/test (a leak that inflates
    validation accuracy). ``warnings`` are worth a look but do not stop training.

    The scans share training's cache (:mod:`alexnet_lit.data.scan_cache`): files unchanged since
    the last scan or fit are not opened again, unless ``rescan``.
    """
    root = Path(root)
    report: dict[str, Any] = {"path": str(root), "splits": {}, "errors": [], "warnings": []}
    errors, warnings = report["errors"], report["warnings"]
    caches = {
        split: ScanCache(root / split, read=not rescan)
        for split in SPLITS
        if (root / split).is_dir()
    }
    scans = {split: scan_split(root / split, decode, cache) for split, cache in caches.items()}
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
    across, within = _duplicates(scans, list(caches.values()))
    report["duplicates_across_splits"] = across
    report["duplicates_within_split"] = within

    for split, scan in scans.items():
        warnings += _case_only_names(split, scan.images)
    # Training's own checks (alexnet_lit.data.folders), so that the doctor passes what it takes.
    train_classes = sorted(scans["train"].images) if "train" in scans else []
    if "train" in scans:
        try:
            read_class_names(root)
        except DataConfigError as err:
            errors.append(str(err))
    for name in report["empty_classes"].get("train", []):
        errors.append(f"train class '{name}' has no usable image.")
    for split in ("val", "test"):
        if split not in scans or not train_classes:
            continue
        images = scans[split].images
        try:
            check_split(root / split, images, train_classes)
        except DataConfigError as err:
            errors.append(str(err))
        missing = [name for name in train_classes if not images.get(name)]
        if missing and any(images.values()):
            warnings.append(f"{split}/ has no images of train classes: {', '.join(missing)}.")
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


def _duplicates(
    scans: Mapping[str, SplitScan], caches: Sequence[ScanCache]
) -> tuple[list[dict], dict[str, list[list[str]]]]:
    images = {
        split: [p for paths in scan.images.values() for p in paths] for split, scan in scans.items()
    }
    across, within = [], {split: [] for split in scans}
    for digest, entries in identical_files(images, caches=caches):
        if len({split for split, _ in entries}) > 1:
            across.append({"hash": digest, "paths": [str(path) for _, path in entries]})
        else:
            within[entries[0][0]].append([str(path) for _, path in entries])
    return across, within


def format_report(report: Mapping[str, Any]) -> str:
    """The doctor's report as readable text (names that are not valid UTF-8 shown as ``\\xNN``;
    the JSON report keeps them exactly)."""
    lines = [f"Dataset: {report['path']}"]
    splits = report["splits"]
    if splits:
        lines += ["", class_count_table({s: v["classes"] for s, v in splits.items()})]
        for split, summary in splits.items():
            lines.append("")
            lines.append(
                f"{split}/: {summary['images']} images, {len(summary['classes'])} classes, "
                f"imbalance {imbalance_text(summary['classes'])}"
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
    return printable("\n".join(lines))


def _case_only_names(split: str, classes: Sequence[str]) -> list[str]:
    """A warning for each set of class folders whose names differ only in case."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(name.casefold(), []).append(name)
    return [
        f"{split}/ has class folders whose names differ only in case: "
        + " and ".join(f"'{name}'" for name in names)
        + " (separate classes here, one folder on a case-insensitive filesystem such as "
        "macOS's or Windows'); rename or merge them."
        for names in groups.values()
        if len(names) > 1
    ]


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
    parser.add_argument(
        "--rescan", action="store_true", help="read every file again, ignoring the scan cache"
    )
    args = parser.parse_args(argv)
    found_errors = False

    def main() -> None:
        nonlocal found_errors
        if not args.path.is_dir():
            raise DataConfigError(f"'{args.path}' is not a folder; pass a dataset root.")
        report = diagnose(args.path, decode=args.decode, rescan=args.rescan)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        found_errors = bool(report["errors"])

    return run_main(main) or int(found_errors)
