"""Dataset folders: which entries are classes and samples, the split scan, the train/val split.

The DataModule and the data doctor (``scripts/check_data.py``) both scan with :func:`scan_split`,
so they agree on which files are classes, samples, hidden entries, non-images and unreadable
images.
"""

import functools
import hashlib
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

from tqdm.auto import tqdm

from alexnet_lit.data.images import (
    READ_ERROR,
    ImageInfo,
    Verdict,
    is_hidden,
    load_image,
    probe,
)
from alexnet_lit.data.samples import path_prefix
from alexnet_lit.data.scan_cache import ScanCache
from alexnet_lit.errors import DataConfigError, first_line

SPLITS = ("train", "val", "test")
# How much of a file the duplicate search compares before it reads the whole file.
HEAD_BYTES = 4096
# Folders with fewer files scan without a progress bar.
PROGRESS_MIN_FILES = 500
# From this many files to probe, several processes probe them, PROBE_CHUNK files at a time.
PARALLEL_MIN_FILES = 2000
PROBE_CHUNK = 256


@dataclass
class SplitScan:
    """What one split folder (``train/``, ``val/``) holds.

    Attributes:
        root: The split folder.
        images: Class name -> usable images (path strings), sorted; a class with none maps to
            ``[]``.
        infos: Image path -> what its header says.
        unreadable: ``(path, reason)`` of images that cannot be used, and of folders that
            cannot be listed.
        not_images: ``(path, reason)`` of other files, ignored.
        hidden: Hidden and system entries that were ignored (not descended into).
        outside_classes: Files directly in the split folder, in no class folder; ignored.
    """

    root: Path
    images: dict[str, list[str]] = field(default_factory=dict)
    infos: dict[str, ImageInfo] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    not_images: list[tuple[str, str]] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    outside_classes: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: len(paths) for name, paths in self.images.items()}


def read_class_names(root: Path) -> list[str]:
    """The class folders of ``root/train``, sorted; at least two of them must hold files.

    Raises:
        DataConfigError: ``root`` or ``root/train`` is missing, or fewer than two class folders
            hold a file (a one-class "classifier" cannot be trained).
    """
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataConfigError(
            f"data.data_dir: '{root}' {what}; pass --data.data_dir pointing at a folder with "
            "train/<class>/ and val/<class>/ inside."
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


def check_split(
    split_dir: Path, images: Mapping[str, Sequence[object]], class_names: Sequence[str]
) -> list[str]:
    """Training's rules for an evaluation split (val/ or test/) from its scan's ``images`` per
    class: the train classes it has no image of, which are worth a warning.

    Raises:
        DataConfigError: It has classes train/ does not, or no image at all.
    """
    unknown = sorted(set(images) - set(class_names))
    if unknown:
        raise DataConfigError(
            f"'{split_dir}' has classes that train/ does not: {', '.join(unknown)}; "
            "add them to train/ or remove them."
        )
    if not any(images.values()):
        raise DataConfigError(
            f"'{split_dir}' has no images (by content: JPEG, PNG, GIF, BMP, TIFF, WebP, "
            f"PPM); put them in {split_dir.name}/<class>/."
        )
    return [name for name in class_names if not images.get(name)]


def _holds_a_file(folder: Path) -> bool:
    """Whether ``folder`` holds a file that is not hidden, at any depth (stops at the first)."""
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        if any(not is_hidden(name) for name in filenames):
            return True
    return False


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity, not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        return os.cpu_count() or 1


def list_classes(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split, without hidden and system folders."""
    return sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not is_hidden(entry.name)
    )


def walk_files(
    folder: Path, hidden: list[Path], unlisted: list[tuple[str, str]] | None = None
) -> list[Path]:
    """Files under ``folder`` (sorted, recursively); hidden entries go to ``hidden`` instead,
    and folders that cannot be listed to ``unlisted`` (see :func:`walk_stats`)."""
    return [Path(path) for path, _ in walk_stats(folder, hidden, unlisted)]


def walk_stats(
    folder: str | Path, hidden: list[Path], unlisted: list[tuple[str, str]] | None = None
) -> list[tuple[str, tuple[int, int] | None]]:
    """The files under ``folder`` as path strings, each with its ``(size, mtime_ns)`` from a
    stat, not an open (None where there is none: a broken link); hidden entries go to
    ``hidden`` instead, and each folder that cannot be listed (its permissions) goes to
    ``unlisted`` as ``(path, reason)``: its images are unreadable, not absent.

    Each folder's files come first, then its subfolders, in name order; links to folders are
    not followed (as ``os.walk`` does it). Strings, not ``Path``s: a million of those cost
    seconds to make, more than the stats.
    """
    found: list[tuple[str, tuple[int, int] | None]] = []

    def visit(directory: str) -> None:
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=attrgetter("name"))
        except OSError as err:
            if unlisted is not None:
                unlisted.append((directory, f"cannot list the folder ({err.strerror})"))
            return
        folders = []
        for entry in entries:
            if is_hidden(entry.name):
                hidden.append(Path(entry.path))
            elif entry.is_dir():
                if not entry.is_symlink():
                    folders.append(entry.path)
            else:
                try:
                    stat = entry.stat()
                    found.append((entry.path, (stat.st_size, stat.st_mtime_ns)))
                except OSError:
                    found.append((entry.path, None))
        for sub in folders:
            visit(sub)

    visit(os.fspath(folder))
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
        unlisted: list[tuple[str, str]] = []
        files = walk_files(item, [], unlisted) if folder else [item]
        infos, unreadable, not_images = scan_files(files, desc=f"scanning {item.name}")
        problems = dict(unreadable) if folder else {**dict(unreadable), **dict(not_images)}
        for path, reason in unlisted:  # a row says that its images were not predicted
            files.append(Path(path))
            problems[Path(path)] = reason
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
    files: Mapping[str, Sequence[str | Path]],
    across_splits: bool = False,
    caches: Sequence[ScanCache] = (),
) -> list[tuple[str, list[tuple[str, Path]]]]:
    """Groups of byte-identical files among the splits' ``files``, as ``(digest, [(split, path),
    ...])`` sorted by their first path; ``across_splits`` keeps only the groups that occur in
    more than one split (a leak that inflates validation accuracy).

    Identical files have equal sizes and equal first bytes, so a file is read whole only when
    another file of its size starts the same: a stat per file, the first 4 KiB of the few that
    share a size, and all of only the likely copies. With the splits' scan ``caches``, each
    digest is computed once per change of its file, and later searches read none.
    """
    stats: dict[Path, tuple[int, int]] = {}

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

    def size(path: Path) -> int:
        stat = os.stat(path)
        stats[path] = (stat.st_size, stat.st_mtime_ns)
        return stat.st_size

    def cached(kind: str, compute: Callable[[Path], str]) -> Callable[[Path], str]:
        def digest_of(path: Path) -> str:
            cache = next((c for c in caches if c.covers(path)), None)
            known = None if cache is None else cache.digest(path, stats[path], kind)
            if known is None:
                known = compute(path)
                if cache is not None:
                    cache.remember(path, stats[path], kind, known)
            return known

        return digest_of

    def head(path: Path) -> str:
        with open(path, "rb") as file:
            return digest(file.read(HEAD_BYTES))

    everything = [(split, Path(path)) for split, paths in files.items() for path in paths]
    by_size = regroup([everything], size)
    by_head = regroup(by_size.values(), cached("head", head))
    same = regroup(by_head.values(), cached("full", lambda path: digest(path.read_bytes())))
    for cache in caches:
        cache.flush()
    groups = [(key[1], sorted(group, key=lambda e: str(e[1]))) for key, group in same.items()]
    return sorted(groups, key=lambda g: str(g[1][0][1]))


def scan_files(
    files: Sequence[str | Path],
    decode: bool = False,
    desc: str = "scanning",
    stats: Sequence[tuple[int, int] | None] | None = None,
    cache: ScanCache | None = None,
    workers: int | None = None,
) -> tuple[dict, list[tuple], list[tuple]]:
    """Probe files: ``(infos, unreadable, not_images)``, each keyed by the path as given (a
    string or a ``Path``); a progress bar on many files.

    Args:
        files: The files, in order.
        decode: Also decode every image that passes the cheap checks (slow; finds the rest).
        desc: The progress bar's label.
        stats: Each file's ``(size, mtime_ns)`` (:func:`walk_stats`), for ``cache``.
        cache: Verdicts of earlier scans: only files that are new or changed are probed, and
            the cache is updated.
        workers: Processes that probe files at once (see :func:`check_files`).
    """
    verdicts: list[Verdict | None] = [None] * len(files)
    if cache is not None and stats is not None:
        verdicts = cache.unchanged(files, stats, decode) or [
            None if stat is None else cache.lookup(path, stat, decode)
            for path, stat in zip(files, stats, strict=True)
        ]
    todo = [i for i, verdict in enumerate(verdicts) if verdict is None]
    headers: dict[int, Verdict] = {}
    checked = check_files([files[i] for i in todo], decode, desc, workers)
    for i, (header, verdict) in zip(todo, checked, strict=True):
        headers[i], verdicts[i] = header, verdict
    if cache is not None and stats is not None and (todo or cache.size != len(files)):
        # A file that failed to decode keeps its header's verdict, so that a scan without
        # decoding reads the same verdict as before; a decoding scan checks it again.
        # A file that could not be read (permissions, gone mid-scan) is not cached: it may be
        # readable next time with the same size and mtime.
        cache.save(
            [
                (path, stat, decode and verdict.info is not None, headers.get(i, verdict))
                for i, (path, stat, verdict) in enumerate(zip(files, stats, verdicts, strict=True))
                if stat is not None and not headers.get(i, verdict).reason.startswith(READ_ERROR)
            ]
        )
    infos, unreadable, not_images = {}, [], []
    for path, verdict in zip(files, verdicts, strict=True):
        if verdict.info is not None:
            infos[path] = verdict.info
        elif verdict.problem == "unreadable":
            unreadable.append((path, verdict.reason))
        else:
            not_images.append((path, verdict.reason))
    return infos, unreadable, not_images


def check_files(
    files: Sequence[str | Path], decode: bool, desc: str = "scanning", workers: int | None = None
) -> list[tuple[Verdict, Verdict]]:
    """``(header verdict, verdict)`` of each file: the cheap checks (:func:`probe`), and with
    ``decode`` a full decode of the images that pass them.

    From :data:`PARALLEL_MIN_FILES` files on, ``workers`` processes (default: one per usable
    CPU, at least 2) probe chunks of them at once, forked as DataLoader workers are, so they
    start at once and import nothing. Processes, not threads: probing a header is Python code
    that holds the GIL, and threads made it slower (docs/speed.md). Without ``fork`` (macOS,
    Windows) the files are probed here, one after another.
    """
    if workers is None:
        workers = max(2, usable_cpus())
    if len(files) < PARALLEL_MIN_FILES or not sys.platform.startswith("linux"):
        workers = 1  # fork is safe on Linux only (macOS: not after system frameworks start)
    show = len(files) >= PROGRESS_MIN_FILES
    check = functools.partial(_check, decode=decode)
    bar = tqdm(total=len(files), desc=desc, unit="file", disable=None if show else True,
               leave=False)  # fmt: skip
    results: list[tuple[Verdict, Verdict]] = []
    with bar:
        if workers <= 1:
            for path in files:
                results.append(check(path))
                bar.update()
            return results
        chunks = [files[i : i + PROBE_CHUNK] for i in range(0, len(files), PROBE_CHUNK)]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for chunk in pool.map(functools.partial(_check_chunk, decode=decode), chunks):
                results += chunk
                bar.update(len(chunk))
    return results


def _check_chunk(paths: Sequence[str | Path], decode: bool) -> list[tuple[Verdict, Verdict]]:
    # Equal verdicts as one object, which pickle then sends back once per chunk.
    seen: dict[Verdict, Verdict] = {}
    return [
        tuple(seen.setdefault(verdict, verdict) for verdict in _check(path, decode))
        for path in paths
    ]


def _check(path: str | Path, decode: bool) -> tuple[Verdict, Verdict]:
    header = probe(path)
    if header.info is None or not decode:
        return header, header
    try:
        load_image(path)
    except Exception as err:  # whatever Pillow raises for broken pixel data
        reason = f"fails to decode ({type(err).__name__}: {first_line(err)})"
        return header, Verdict(problem="unreadable", reason=reason)
    return header, header


def scan_split(
    split_dir: Path,
    decode: bool = False,
    cache: ScanCache | None = None,
    workers: int | None = None,
) -> SplitScan:
    """Scan ``split_dir/<class>/**`` with cheap checks (headers, not pixels).

    Args:
        split_dir: A split folder such as ``dataset/train``.
        decode: Also decode each image (slow); see :func:`scan_files`.
        cache: The split's :class:`~alexnet_lit.data.scan_cache.ScanCache`: files whose size
            and mtime are unchanged since it was written are not opened.
        workers: Files probed at once (see :func:`check_files`).
    """
    scan = SplitScan(Path(split_dir))
    files_by_class: dict[str, list[str]] = {}
    stats: list[tuple[int, int] | None] = []
    unlisted: list[tuple[str, str]] = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if is_hidden(entry.name):
            scan.hidden.append(Path(entry.path))
        elif entry.is_dir():
            found = walk_stats(entry.path, scan.hidden, unlisted)
            files_by_class[entry.name] = [file for file, _ in found]
            stats += [stat for _, stat in found]
        else:
            scan.outside_classes.append(Path(entry.path))
    files = [path for paths in files_by_class.values() for path in paths]
    infos, scan.unreadable, scan.not_images = scan_files(
        files, decode, f"scanning {split_dir.name}/", stats, cache, workers
    )
    scan.unreadable += unlisted
    scan.infos = infos
    scan.images = {
        name: [path for path in paths if path in infos] for name, paths in files_by_class.items()
    }
    return scan


def split_train_val(
    images: Mapping[str, Sequence[str]], val_split: float, seed: int, root: Path
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """A stratified, seeded split of each class's images (paths under ``root``) into train and
    val.

    The order within a class is a hash of the seed and the path relative to ``root``, so the
    split depends only on the file list and the seed: every process of a distributed run, and
    every later run on the same files, gets the same split. Each class with at least two images
    gives at least one to val and keeps at least one for train.
    """
    under = len(path_prefix(root))
    train, val = {}, {}
    for name, paths in images.items():

        def key(path: str) -> str:
            relative = os.fspath(path)[under:].replace(os.sep, "/")
            # surrogateescape: a name that is not valid UTF-8 hashes as its bytes, not an error
            return hashlib.sha256(
                f"{seed}:{relative}".encode("utf-8", "surrogateescape")
            ).hexdigest()

        ordered = sorted(paths, key=key)
        n_val = round(len(ordered) * val_split)
        if val_split > 0 and len(ordered) >= 2:
            n_val = min(max(n_val, 1), len(ordered) - 1)
        val[name] = sorted(ordered[:n_val], key=_path_order)
        train[name] = sorted(ordered[n_val:], key=_path_order)
    return train, val


def _path_order(path: str) -> list[str]:
    """Sorts path strings as ``Path`` objects sort: folder by folder."""
    return os.fspath(path).split(os.sep)


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
