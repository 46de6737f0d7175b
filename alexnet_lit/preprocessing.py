"""The preprocessing record: what a checkpoint stores so that every later use of the model
(predict, export, the notebook, the report) rebuilds the eval input exactly, and the one
normalization that turns a preset's uint8 pixels into the network's input.
"""

from collections.abc import Sequence
from typing import Any

import torch

# The tutorial's normalization: maps [0, 1] to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_SIZE = 224
# The smallest input both AlexNets take: their 11x11 stride-4 convolution and three 3x3 stride-2
# max-pools leave a 1x1 map at 65 pixels (torchvision's, padded by 2, at 63).
MIN_IMAGE_SIZE = 65
# Eval resizes the short side to 256 for a 224 crop (torchvision's ratio) and scales with size.
RESIZE_RATIO = 256 / 224


def preprocessing_record(
    image_size: int = IMAGE_SIZE,
    in_channels: int = 3,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> dict[str, Any]:
    """Everything needed to rebuild the eval preset, as plain data for a checkpoint."""
    return {
        "image_size": int(image_size),
        "resize_size": round(image_size * RESIZE_RATIO),
        "in_channels": int(in_channels),
        "mean": [float(m) for m in mean[:in_channels]],
        "std": [float(s) for s in std[:in_channels]],
    }


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """``uint8 [B, H, W, C]`` (as presets make them) -> the network's float32 ``[B, C, H, W]``
    input, ``(x / 255 - mean) / std``, on the images' device.

    The values of torchvision's ``ToDtype(float32, scale=True)`` + ``Normalize``, in one
    conversion and one multiply-add per batch; channels-last by default, the memory layout
    oneDNN and cuDNN convolutions run fastest in (and the one ``[B, H, W, C]`` already has).
    """
    std_ = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    mean_ = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    floats = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format)
    return floats.mul_(1.0 / (255.0 * std_)).sub_(mean_ / std_)
