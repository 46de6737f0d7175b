"""Image presets: the one place that defines image size, normalization and augmentation.

A preset turns one image file into a ``uint8 [S, S, C]`` tensor (height, width, channels: the
layout Pillow decodes to) at the network's input size: the crop and resize happen in 8 bits, in
Pillow, in the loader workers. The training device then converts each batch to float and
normalizes it once (:func:`normalize`): a quarter of the bytes cross from the workers and get
pinned, and ``[B, S, S, C]`` is already the channels-last memory the convolutions read. A JPEG is
decoded at the smallest of its 1/2, 1/4 and 1/8 scales (Pillow's ``draft``) that still leaves
the crop at or above the output size: a 12-megapixel photo whose crop becomes a 224x224 input is
not decoded whole.
"""

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from alexnet_lit.data.images import open_image, shown_size, to_rgb_or_l
from alexnet_lit.preprocessing import IMAGE_SIZE, MEAN, RESIZE_RATIO, STD, normalize

# RandomResizedCrop's aspect-ratio range, torchvision's default.
CROP_RATIO = (3 / 4, 4 / 3)
# Training augmentation presets: "tutorial" is crop + flip; "strong" adds TrivialAugmentWide and
# RandomErasing (torchvision's reference recipe for its newer classification weights).
AUGMENT_PRESETS = ("tutorial", "strong")
# The reduced scales libjpeg decodes at, largest reduction first.
JPEG_SCALES = (8, 4, 2)

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels


class Preset:
    """Reads an image file as ``uint8 [S, S, C]``, decoding only what its crop needs.

    Subclasses say which region of the (EXIF-oriented) image becomes the output
    (:meth:`crop_box`) and how it is resized and augmented (:meth:`finish`).

    Args:
        image_size: ``S``, the side of the square output.
        in_channels: 3 for RGB, 1 for grayscale.
    """

    def __init__(self, image_size: int, in_channels: int = 3) -> None:
        self.image_size = int(image_size)
        self.in_channels = in_channels

    def read(self, path: str | Path) -> torch.Tensor:
        """The output for the file ``path``; every mode converted as ``load_image`` does."""
        with open_image(path) as image:
            box = self.crop_box(*shown_size(image))
            scale = self._reduce_jpeg(image, box)
            image.load()
            picture = to_rgb_or_l(image, self.in_channels)
        return self.finish(picture, tuple(value / scale for value in box))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The output for an image already loaded and converted (nothing left to save)."""
        return self.finish(image, self.crop_box(*image.size))

    def crop_box(self, width: int, height: int) -> Box:
        """The region of a ``width`` x ``height`` image that becomes the output."""
        raise NotImplementedError

    def finish(self, image: Image.Image, box: Box) -> torch.Tensor:
        """Resize ``box`` of ``image`` to S x S (and augment it), as uint8 ``[S, S, C]``."""
        raise NotImplementedError

    def _reduce_jpeg(self, image: Image.Image, box: Box) -> int:
        """Before decoding: ask a JPEG for the largest reduction that leaves ``box`` at least S
        on its short side; returns the reduction it took (1 for other formats)."""
        shortest = min(box[2] - box[0], box[3] - box[1])
        wanted = next((s for s in JPEG_SCALES if shortest / s >= self.image_size), 1)
        if wanted == 1:
            return 1
        width = image.width
        drafted = image.draft(None, (width // wanted, image.height // wanted))
        return 1 if drafted is None else round(width / drafted[1][2])  # box (0, 0, W/s, H/s)


class TrainPreset(Preset):
    """The training preset: torchvision's ``RandomResizedCrop`` (the same sampling: its own
    ``get_params``), a horizontal flip, and with ``augment="strong"`` TrivialAugmentWide.

    ``strong`` also erases a random rectangle (RandomErasing) after normalization, which happens
    per batch on the device (:func:`random_erasing`).
    """

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        in_channels: int = 3,
        crop_scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        augment: str = "tutorial",
    ) -> None:
        super().__init__(image_size, in_channels)
        if augment not in AUGMENT_PRESETS:
            raise ValueError(
                f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {augment!r}; "
                "pick one of those presets."
            )
        self.crop_scale = [float(crop_scale[0]), float(crop_scale[1])]
        self.hflip = hflip
        self.augment = augment
        self.trivial_augment = v2.TrivialAugmentWide() if augment == "strong" else None

    def crop_box(self, width: int, height: int) -> Box:
        # get_params reads only the shape: a tensor of that shape that owns no memory.
        shape = torch.empty(()).expand(1, height, width)
        top, left, h, w = RandomResizedCrop.get_params(shape, self.crop_scale, list(CROP_RATIO))
        return (left, top, left + w, top + h)

    def finish(self, image: Image.Image, box: Box) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.Resampling.BILINEAR, box=box)
        flip = self.hflip and torch.rand(1) < 0.5  # RandomHorizontalFlip's draw, in its order
        if self.trivial_augment is not None:
            image = self.trivial_augment(
                image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
            )
            return _hwc(image)
        pixels = _hwc(image)
        return pixels.flip(1) if flip else pixels


class EvalPreset(Preset):
    """The deterministic eval preset: ``Resize(resize_size)`` (the short side) then
    ``CenterCrop(image_size)`` as torchvision computes them, in one resize of the crop's region.

    Its arguments are those of :func:`preprocessing_record` (mean and std are for
    :func:`normalize`), so ``EvalPreset(**hparams["preprocessing"])`` rebuilds it.
    """

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        in_channels: int = 3,
        resize_size: int | None = None,
        mean: Sequence[float] = MEAN,
        std: Sequence[float] = STD,
    ) -> None:
        super().__init__(image_size, in_channels)
        self.resize_size = round(image_size * RESIZE_RATIO) if resize_size is None else resize_size
        self.mean, self.std = list(mean[:in_channels]), list(std[:in_channels])

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """torchvision's ``Resize(resize_size)`` output size: the short side ``resize_size``."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def crop_box(self, width: int, height: int) -> Box:
        new_width, new_height = self._resized(width, height)
        top = round((new_height - self.image_size) / 2.0)  # as CenterCrop rounds
        left = round((new_width - self.image_size) / 2.0)
        sx, sy = width / new_width, height / new_height
        return (left * sx, top * sy, (left + self.image_size) * sx, (top + self.image_size) * sy)

    def finish(self, image: Image.Image, box: Box) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if self.resize_size >= self.image_size:
            # The crop's own region in one resize: the sampling of resizing the whole image and
            # cropping it, without resizing what the crop throws away.
            return _hwc(image.resize(size, Image.Resampling.BILINEAR, box=box))
        # A crop larger than the resized image: CenterCrop pads it, as torchvision does.
        image = image.resize(self._resized(*image.size), Image.Resampling.BILINEAR)
        return F.center_crop(F.pil_to_tensor(image), list(size)).permute(1, 2, 0).contiguous()


def _hwc(image: Image.Image) -> torch.Tensor:
    """A PIL image's pixels as ``uint8 [H, W, C]``, one copy, no transpose."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def eval_transform(**preprocessing: Any):
    """One PIL image -> the normalized float ``[C, S, S]`` input the model was trained with.

    For notebooks and scripts that hold a checkpoint's ``hparams["preprocessing"]``:
    ``eval_transform(**model.hparams.preprocessing)(image).unsqueeze(0)`` is a batch of one.
    """
    return partial(_eval_one, EvalPreset(**preprocessing))


def _eval_one(preset: EvalPreset, image: Image.Image) -> torch.Tensor:
    return normalize(preset(image)[None], preset.mean, preset.std, torch.contiguous_format)[0]


def random_erasing(images: torch.Tensor, p: float = 0.25) -> torch.Tensor:
    """The strong preset's RandomErasing: each normalized image of ``[B, C, H, W]`` gets its own
    random rectangle (with probability ``p``), on the images' device."""
    erase = v2.RandomErasing(p=p)
    return torch.stack([erase(image) for image in images])
