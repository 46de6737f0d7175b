"""Image presets: the one place that defines image size, normalization and augmentation."""

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

# The tutorial's normalization: maps [0, 1] to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_SIZE = 224
# Eval resizes the short side to 256 for a 224 crop (torchvision's ratio) and scales with size.
RESIZE_RATIO = 256 / 224


def preprocessing_record(
    image_size: int = IMAGE_SIZE,
    in_channels: int = 3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> dict[str, Any]:
    """Everything needed to rebuild the eval transform, as plain data for a checkpoint."""
    return {
        "image_size": int(image_size),
        "resize_size": round(image_size * RESIZE_RATIO),
        "in_channels": int(in_channels),
        "mean": [float(m) for m in mean[:in_channels]],
        "std": [float(s) for s in std[:in_channels]],
    }


def train_transform(
    image_size: int = IMAGE_SIZE,
    in_channels: int = 3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: bool = True,
) -> v2.Compose:
    """The tutorial's training preset: RandomResizedCrop + horizontal flip + normalize.

    Args:
        image_size: Side of the square crop fed to the network.
        in_channels: 3 for RGB or 1 for grayscale; selects the matching mean and std.
        mean: Per-channel normalization mean.
        std: Per-channel normalization standard deviation.
        crop_scale: Area range of RandomResizedCrop, as a fraction of the image.
        hflip: Whether to flip horizontally at random.
    """
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += _to_normalized_float(in_channels, mean, std)
    return v2.Compose(steps)


def eval_transform(
    image_size: int = IMAGE_SIZE,
    in_channels: int = 3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
    resize_size: int | None = None,
) -> v2.Compose:
    """The deterministic eval preset: resize the short side, then a center crop.

    The arguments are those of :func:`preprocessing_record`, so a checkpoint's record rebuilds
    the exact transform with ``eval_transform(**hparams["preprocessing"])``.
    """
    if resize_size is None:
        resize_size = round(image_size * RESIZE_RATIO)
    steps = [
        v2.ToImage(),
        v2.Resize(resize_size, antialias=True),
        v2.CenterCrop(image_size),
        *_to_normalized_float(in_channels, mean, std),
    ]
    return v2.Compose(steps)


def _to_normalized_float(in_channels: int, mean: Sequence[float], std: Sequence[float]) -> list:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean[:in_channels]), list(std[:in_channels])),
    ]
