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
# Training augmentation presets: "tutorial" is crop + flip; "strong" adds TrivialAugmentWide and
# RandomErasing (torchvision's reference recipe for its newer classification weights).
AUGMENT_PRESETS = ("tutorial", "strong")


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
    augment: str = "tutorial",
    erase_prob: float = 0.25,
) -> v2.Compose:
    """The training preset: RandomResizedCrop + horizontal flip + normalize (the tutorial's).

    Args:
        image_size: Side of the square crop fed to the network.
        in_channels: 3 for RGB or 1 for grayscale; selects the matching mean and std.
        mean: Per-channel normalization mean.
        std: Per-channel normalization standard deviation.
        crop_scale: Area range of RandomResizedCrop, as a fraction of the image.
        hflip: Whether to flip horizontally at random.
        augment: ``"tutorial"`` (crop and flip only) or ``"strong"`` (adds TrivialAugmentWide
            after the crop and RandomErasing after normalization).
        erase_prob: RandomErasing's probability in the ``"strong"`` preset.
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(
            f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {augment!r}; "
            "pick one of those presets."
        )
    steps = [
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True),
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment == "strong":
        steps.append(v2.TrivialAugmentWide())
    steps += _to_normalized_float(in_channels, mean, std)
    if augment == "strong":
        steps.append(v2.RandomErasing(p=erase_prob))
    return v2.Compose(steps)


def batch_mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """MixUp and/or CutMix for a batch of ``(images, integer labels)``; None when both are 0.

    The returned transform maps ``(images [B,C,H,W], labels [B])`` to mixed images and soft
    labels ``[B, num_classes]``; with both alphas set, each batch gets one of the two at random.
    """
    mixes = []
    if mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


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
