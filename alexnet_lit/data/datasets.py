"""The one dataset of labelled image files, and the collate that sets unreadable images aside.

Training, validation, test, the CLI's ``predict`` and ``scripts/predict.py`` all read images
through :class:`ImageListDataset` and :class:`SkippingCollate`: an image that fails to load
becomes a :class:`BadImage` in the worker, travels with its batch, and is recorded (or, for
prediction, given an error row) in the main process. A broken file is never fatal.
"""

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, default_collate

from alexnet_lit.errors import first_line


class BadImage(NamedTuple):
    """What the dataset returns, instead of a sample, for an image that fails to load."""

    index: int
    path: str
    reason: str


def bad_image(index: int, path: str | Path, err: Exception) -> BadImage:
    """The record of the image at ``index`` that raised ``err`` while loading."""
    return BadImage(index, str(path), f"{type(err).__name__}: {first_line(err)}")


class LoadedBatch(NamedTuple):
    """A collated batch: the images that loaded, and the ones set aside (recorded by the
    DataModule's ``on_before_batch_transfer`` in the main process)."""

    images: torch.Tensor  # [B, S, S, C] uint8, from a preset
    targets: torch.Tensor  # [B], class indices; -1 for unlabelled images
    indices: torch.Tensor  # [B], each image's index in the dataset
    skipped: list[BadImage]


class ImageListDataset(Dataset):
    """Images from a list of ``(path, class_index)`` pairs, as ``(image, class_index, index)``.

    Args:
        samples: ``(path, class_index)`` pairs; the index is -1 for unlabelled images.
        read: Turns one file into the network's input, e.g. ``TrainPreset(...).read`` (a uint8
            ``[S, S, C]`` tensor; see :mod:`alexnet_lit.data.presets`).
        unreadable: Paths of ``samples`` a scan already found unreadable, with the reason: each
            becomes a :class:`BadImage` with that reason, unread (an image Pillow cannot open,
            such as HEIC, gets the scan's advice rather than Pillow's error).

    An image that fails to load becomes a :class:`BadImage`, which :class:`SkippingCollate`
    sets aside.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        read: Callable[[Path], torch.Tensor],
        unreadable: Mapping[Path, str] | None = None,
    ) -> None:
        # A SampleList stays one: its arrays are what forked workers share (data/samples.py).
        self.samples = samples if isinstance(samples, Sequence) else list(samples)
        self.read = read
        self.unreadable = dict(unreadable or {})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | BadImage:
        # Training's samplers give (index, seed): the image's random crop and flip are drawn from
        # that seed, whichever process reads it (alexnet_lit.data.samplers).
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        if path in self.unreadable:
            return BadImage(index, str(path), self.unreadable[path])
        try:
            if seed is None:
                image = self.read(path)
            else:
                with torch.random.fork_rng(devices=[]):  # the process's own stream is left as is
                    torch.manual_seed(seed)
                    image = self.read(path)
        # A broken file raises anything from OSError to SyntaxError, in Pillow or a transform.
        except Exception as err:
            return bad_image(index, path, err)
        return image, target, index

    @property
    def targets(self) -> list[int]:
        targets = getattr(self.samples, "targets", None)
        return targets if targets is not None else [target for _, target in self.samples]


class SkippingCollate:
    """Collates the images of a batch that loaded into a :class:`LoadedBatch`, with the
    :class:`BadImage` records aside. A batch of only bad images becomes an empty one.

    Args:
        empty_shape: The shape of one image (``(S, S, C)`` uint8, from a preset), for the empty
            batch.
    """

    def __init__(self, empty_shape: Sequence[int]) -> None:
        self.empty_shape = tuple(empty_shape)

    def __call__(self, items: list) -> LoadedBatch:
        skipped = [item for item in items if isinstance(item, BadImage)]
        good = [item for item in items if not isinstance(item, BadImage)]
        if not good:
            empty = torch.empty((0, *self.empty_shape), dtype=torch.uint8)
            none = torch.empty(0, dtype=torch.long)
            return LoadedBatch(empty, none, none, skipped)
        images, targets, indices = default_collate(good)
        return LoadedBatch(images, targets, indices, skipped)
