"""The sample list: ``(path, class_index)`` pairs held in three NumPy arrays.

A Python list of ``(Path, int)`` tuples costs ~400 bytes a sample (77 MiB per 200,000 files),
and every DataLoader worker that reads it writes to the objects' reference counts, so the
forked worker slowly copies every page it touches: 8 ranks x 8 workers hold 64 private copies
(pytorch/pytorch#13246). :class:`SampleList` keeps one byte buffer of the encoded paths
(relative to a root), their end offsets and the labels: ~50 bytes a sample, in a few large
objects whose pages a forked worker reads without writing, so they stay shared.
"""

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np


def path_prefix(root: str | Path) -> str:
    """What paths under ``root``, as ``root / name`` builds them, start with: ``root`` and one
    separator, or nothing for the current folder (``Path(".") / "x"`` is ``x``)."""
    root = os.fspath(root)
    return "" if root in ("", ".") else os.path.join(root, "")


class SampleList(Sequence[tuple[Path, int]]):
    """An immutable sequence of ``(path, class_index)``, stored compactly.

    Args:
        samples: The pairs; the paths must lie under ``root``.
        root: The folder the stored paths are relative to (the dataset root).
    """

    def __init__(self, samples: Iterable[tuple[str | Path, int]], root: str | Path) -> None:
        self.root = Path(root)
        under = os.fsencode(path_prefix(root))
        names, labels = [], []
        for path, label in samples:
            encoded = os.fsencode(path)
            if not encoded.startswith(under):
                raise ValueError(f"sample '{path}' is not under '{self.root}'")
            names.append(encoded[len(under) :])
            labels.append(label)
        self._blob = np.frombuffer(b"".join(names), dtype=np.uint8)
        self._ends = np.cumsum([len(name) for name in names], dtype=np.int64)
        self._labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    @overload
    def __getitem__(self, index: int) -> tuple[Path, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[Path, int]]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = int(self._ends[index - 1]) if index else 0
        name = self._blob[start : int(self._ends[index])].tobytes()
        return self.root / os.fsdecode(name), int(self._labels[index])

    def __iter__(self) -> Iterator[tuple[Path, int]]:
        for index in range(len(self)):
            yield self[index]

    @property
    def targets(self) -> list[int]:
        """The class index of every sample, in order."""
        return self._labels.tolist()

    @property
    def nbytes(self) -> int:
        """The memory the arrays hold."""
        return self._blob.nbytes + self._ends.nbytes + self._labels.nbytes


def compact(samples: Sequence[tuple[Path, int]], root: str | Path) -> Sequence[tuple[Path, int]]:
    """``samples`` as a :class:`SampleList` under ``root`` (unchanged if it already is one)."""
    return samples if isinstance(samples, SampleList) else SampleList(samples, root)
