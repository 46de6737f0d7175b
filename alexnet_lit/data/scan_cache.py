"""The scan cache: what each file of a split folder was found to be, kept between runs.

A split folder of a million images takes minutes to scan, because every file is opened to read
its header. The verdicts (image: format, mode and size; or unreadable / not an image, with the
reason) are kept here, keyed by the folder's absolute path and each file's size and modification
time, as ``os.stat`` gives them without opening the file. A later scan probes only the files
that are new or changed, and forgets the ones that are gone.

The cache lives in the user's cache directory (``$ALEXNET_LIT_CACHE``, else
``$XDG_CACHE_HOME/alexnet-lit``, else ``~/.cache/alexnet-lit``), never in the dataset, which
may be read-only. It is a NumPy ``.npz`` file of plain arrays, loaded with
``allow_pickle=False``: reading it never runs code. A file that cannot be read is ignored with
one warning and rewritten.
"""

import hashlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import astuple
from itertools import accumulate
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from alexnet_lit.data.images import ImageInfo, Verdict

FORMAT = 3
_KINDS = {None: 0, "unreadable": 1, "not_image": 2}
_PROBLEMS = {code: problem for problem, code in _KINDS.items()}
_FS = sys.getfilesystemencoding()


def user_cache_dir() -> Path:
    """The project's folder in the user's cache directory."""
    if os.environ.get("ALEXNET_LIT_CACHE"):
        return Path(os.environ["ALEXNET_LIT_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache, "alexnet-lit")


class ScanCache:
    """The cached verdicts of one split folder's files.

    Args:
        folder: The split folder (``dataset/train``).
        directory: Where cache files go; ``None``: :func:`user_cache_dir` ``/ "scans"``.
        read: ``False`` ignores what is cached (``data.rescan``); the new scan is still saved.
    """

    def __init__(self, folder: Path, directory: Path | None = None, read: bool = True) -> None:
        self.folder = Path(folder).absolute()
        self._given = os.fsencode(os.path.join(folder, ""))  # paths under it, as scans build them
        key = hashlib.blake2b(os.fsencode(self.folder), digest_size=12).hexdigest()
        self.path = Path(directory or user_cache_dir() / "scans", f"{key}.npz")
        self._clear()
        if read:
            self._load()

    def _clear(self) -> None:
        self._blob, self._ends = b"", []  # the paths relative to the folder, joined; their ends
        self._rows: dict[bytes, int] = {}  # key -> its row in the lists below
        self._stats: list[tuple[int, int]] = []  # (size, mtime_ns)
        self._decoded: list[bool] = []
        self._verdict_of: list[int] = []  # the row's verdict in _verdicts
        self._verdicts: list[Verdict] = []
        # key -> ((size, mtime_ns), head digest, full digest) for the duplicate search
        self._digests: dict[bytes, tuple[tuple[int, int], str, str]] = {}
        self._changed = False

    @property
    def size(self) -> int:
        """How many files the cache knows."""
        return len(self._stats)

    @property
    def _keys(self) -> list[bytes]:
        """Each file's path relative to the folder, as bytes, in row order."""
        starts = [0, *self._ends[:-1]]
        return [self._blob[a:b] for a, b in zip(starts, self._ends, strict=True)]

    def unchanged(
        self, paths: Sequence[str | Path], stats: Sequence[tuple[int, int] | None], decoded: bool
    ) -> list[Verdict] | None:
        """Every file's cached verdict when the folder holds exactly the cached files, in the
        cached order, each with its cached size and mtime (the usual case, checked in a few
        list comparisons); None otherwise (then :meth:`lookup` goes file by file)."""
        if len(paths) != len(self._stats) or (decoded and not all(self._decoded)):
            return None
        if list(stats) != self._stats or not self._same_paths(paths):
            return None
        verdicts = self._verdicts
        return [verdicts[row] for row in self._verdict_of]

    def _same_paths(self, paths: Sequence[str | Path]) -> bool:
        """Whether ``paths`` are the cached files, in order: compared as one joined buffer,
        not as an object per file (a million of those take a second)."""
        if not paths:
            return not self._ends
        given = os.fsdecode(self._given)
        joined = "\0".join(map(os.fspath, paths))  # no path holds a NUL
        if not joined.startswith(given) or joined.count("\0" + given) != len(paths) - 1:
            return False  # not all under the folder as scans spell it: lookup decides
        relative = joined[len(given) :].replace("\0" + given, "\0").encode(_FS, "surrogateescape")
        buffer = np.frombuffer(relative, dtype=np.uint8)
        # The i-th NUL sits i bytes after the i-th path's end in the unseparated blob.
        ends = np.append(np.flatnonzero(buffer == 0), len(buffer)) - np.arange(len(paths))
        return relative.replace(b"\0", b"") == self._blob and np.array_equal(ends, self._ends)

    def lookup(self, path: str | Path, stat: tuple[int, int], decoded: bool) -> Verdict | None:
        """The cached verdict of ``path`` if its size and mtime are unchanged (and it was
        decoded, where ``decoded`` asks for that)."""
        if len(self._rows) != len(self._stats):  # made on the first lookup
            self._rows = {key: row for row, key in enumerate(self._keys)}
        row = self._rows.get(self._key(path))
        if row is None or self._stats[row] != stat or (decoded and not self._decoded[row]):
            return None
        return self._verdicts[self._verdict_of[row]]

    def save(self, entries: Sequence[tuple[str | Path, tuple[int, int], bool, Verdict]]) -> None:
        """Replace the cache with ``entries``: ``(path, (size, mtime_ns), decoded, verdict)``;
        the digests of files whose size and mtime are unchanged are kept.

        Written to a temporary file and renamed, so a reader never sees half a cache; a cache
        directory that cannot be written is a warning (the next run scans again)."""
        # Most files share a verdict (same format, mode and size): a table of the distinct ones,
        # and each file's row in it.
        table: dict[Verdict, int] = {}
        by_object: dict[int, int] = {}  # id(verdict) -> its row in table: scans share objects
        keys, stats, decoded, verdict_of = [], [], [], []
        for path, stat, was_decoded, verdict in entries:
            keys.append(self._key(path))
            stats.append(tuple(stat))
            decoded.append(was_decoded)
            row = by_object.get(id(verdict))
            if row is None:
                row = by_object[id(verdict)] = table.setdefault(verdict, len(table))
            verdict_of.append(row)
        self._blob, self._ends = b"".join(keys), list(accumulate(map(len, keys)))
        self._stats, self._decoded = stats, decoded
        self._verdict_of, self._verdicts, self._rows = verdict_of, list(table), {}
        self._write()

    def digest(self, path: str | Path, stat: tuple[int, int], kind: str) -> str | None:
        """The cached ``kind`` digest (``"head"``: of the first bytes, ``"full"``: of the whole
        file) of ``path`` if its size and mtime are unchanged, else None."""
        entry = self._digests.get(self._key(path))
        if entry is None or entry[0] != tuple(stat):
            return None
        return entry[1 if kind == "head" else 2] or None

    def remember(self, path: str | Path, stat: tuple[int, int], kind: str, digest: str) -> None:
        """Keep a digest of ``path`` (see :meth:`digest`) until :meth:`flush`."""
        key = self._key(path)
        stat = tuple(stat)
        old = self._digests.get(key)
        head, full = (old[1], old[2]) if old is not None and old[0] == stat else ("", "")
        self._digests[key] = (stat, digest, full) if kind == "head" else (stat, head, digest)
        self._changed = True

    def covers(self, path: str | Path) -> bool:
        """Whether ``path`` lies in this cache's folder."""
        return os.fsencode(path).startswith(self._given)

    def flush(self) -> None:
        """Write the digests remembered since the cache was read or saved."""
        if self._changed:
            self._write()

    def _write(self) -> None:
        self._changed = False
        rows = {key: row for row, key in enumerate(self._keys)} if self._digests else {}
        digests = {
            rows[key]: [head, full]
            for key, (stat, head, full) in self._digests.items()
            if key in rows and self._stats[rows[key]] == stat
        }
        arrays = {
            "paths": np.frombuffer(self._blob, dtype=np.uint8),
            "ends": np.array(self._ends, dtype=np.int64),
            "size": np.array([stat[0] for stat in self._stats], dtype=np.int64),
            "mtime": np.array([stat[1] for stat in self._stats], dtype=np.int64),
            "decoded": np.array(self._decoded, dtype=bool),
            "verdict": np.array(self._verdict_of, dtype=np.int32),
        }
        verdicts = [
            [_KINDS[v.problem], v.reason] + ([*astuple(v.info)] if v.info else [])
            for v in self._verdicts
        ]
        for name, value in (("meta", self._meta()), ("verdicts", verdicts), ("digests", digests)):
            arrays[name] = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                dir=self.path.parent, prefix=self.path.stem, suffix=".tmp", delete=False
            ) as file:
                np.savez(file, **arrays)
            os.replace(file.name, self.path)
        except OSError as err:
            warnings.warn(
                f"scan cache not written to '{self.path}' ({err.strerror or err}); the next run "
                "scans again. Set ALEXNET_LIT_CACHE to a writable folder.",
                stacklevel=3,
            )

    def _key(self, path: str | Path) -> bytes:
        """The path relative to the folder, as bytes (by slicing: a million of them)."""
        encoded = path.encode(_FS, "surrogateescape") if isinstance(path, str) else bytes(path)
        if encoded.startswith(self._given):
            return encoded[len(self._given) :]
        return os.fsencode(Path(path).absolute().relative_to(self.folder))

    def _load(self) -> None:
        try:
            if not self.path.is_file():
                return
            with open(self.path, "rb") as file, np.load(file, allow_pickle=False) as data:
                meta = json.loads(data["meta"].tobytes())
                if meta != self._meta():
                    return  # another format, Pillow or pixel limit: its verdicts may differ
                verdicts = [_verdict(*row) for row in json.loads(data["verdicts"].tobytes())]
                blob, ends = data["paths"].tobytes(), data["ends"].tolist()
                sizes, mtimes = data["size"].tolist(), data["mtime"].tolist()
                decoded, verdict_of = data["decoded"].tolist(), data["verdict"].tolist()
                digests = json.loads(data["digests"].tobytes())
            stats = list(zip(sizes, mtimes, strict=True))
            if len({len(ends), len(stats), len(decoded), len(verdict_of)}) != 1:
                raise ValueError("columns of different lengths")
            if verdict_of and not 0 <= min(verdict_of) <= max(verdict_of) < len(verdicts):
                raise ValueError("a verdict out of range")
            self._blob, self._ends, self._stats = blob, ends, stats
            self._decoded, self._verdict_of, self._verdicts = decoded, verdict_of, verdicts
            if digests:
                keys = self._keys
                self._digests = {
                    keys[int(row)]: (stats[int(row)], head, full)
                    for row, (head, full) in digests.items()
                }
        except Exception as err:  # whatever a damaged file raises: OS, zip, npy, JSON, index
            self._clear()
            warnings.warn(
                f"ignoring the damaged scan cache '{self.path}' ({type(err).__name__}); "
                "scanning again and rewriting it.",
                stacklevel=3,
            )

    def _meta(self) -> dict:
        """What the verdicts depend on besides the files: a change makes the cache stale."""
        return {
            "format": FORMAT,
            "folder": os.fsdecode(os.fsencode(self.folder)),
            "pillow": PIL.__version__,
            "max_image_pixels": Image.MAX_IMAGE_PIXELS,
        }


def _verdict(kind: int, reason: str, *info: str | int) -> Verdict:
    if kind == 0:
        return Verdict(info=ImageInfo(*info))
    return Verdict(problem=_PROBLEMS[kind], reason=reason)
