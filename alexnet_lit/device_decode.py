"""Decode on the training device: workers read JPEG bytes, the main process decodes and augments.

For GPUs whose loader workers cannot decode and augment fast enough (``data.decode_on_device``).
A worker returns a plain JPEG's encoded bytes, or any other image decoded on the CPU by
:func:`~alexnet_lit.images.load_image`; the main process decodes all JPEGs of a batch in one
``torchvision.io.decode_jpeg`` call on the device and applies the same train/eval preset
(:mod:`alexnet_lit.transforms`) there, image by image, then normalizes the stacked batch once.
"""

import functools
import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from alexnet_lit.images import load_image

JPEG_SIGNATURE = b"\xff\xd8\xff"
EXIF_ORIENTATION = 0x0112


def is_plain_jpeg(data: bytes) -> bool:
    """Whether ``decode_jpeg(mode=RGB)`` gives what :func:`load_image` gives: a JPEG in RGB or L
    with no EXIF rotation. Parses the header only."""
    if not data.startswith(JPEG_SIGNATURE):
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            return image.mode in ("RGB", "L") and orientation == 1
    except Exception:  # a broken header: load_image meets it and raises the usual error
        return False


def read_for_device(path: str | Path, in_channels: int = 3) -> torch.Tensor:
    """A plain JPEG's bytes (1-D uint8), else the image decoded by ``load_image`` (uint8 CHW)."""
    with open(path, "rb") as file:
        data = file.read()
    if in_channels == 3 and is_plain_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    # From the path, not the bytes: a failure then reads exactly as on the normal path.
    return F.pil_to_tensor(load_image(path, in_channels))


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode CPU byte tensors to RGB uint8 CHW tensors on ``device``: one batched call, and one
    call per image if that raises; None for each image that cannot be decoded."""
    if not encoded:
        return []
    if device.type != "cuda":
        return _decode_jpegs(encoded, device)
    # torchvision's GPU decoder allocates its outputs on the current stream but writes them from
    # a stream of its own that does not wait for the current one, so it can be handed, and
    # overwrite, memory that queued kernels of the previous training step still read (see
    # pytorch/vision PR 9606). Allocating on a stream used only for decoding keeps it to blocks
    # it had itself; record_stream keeps each output from reuse until the training stream is done.
    main = torch.cuda.current_stream(device)
    with torch.cuda.stream(_decode_stream(device)):
        decoded = _decode_jpegs(encoded, device)
    main.wait_stream(_decode_stream(device))
    for image in decoded:
        if image is not None:
            image.record_stream(main)
    return decoded


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    with warnings.catch_warnings():
        # torchvision >= 0.28 deprecates its image decoders in favour of TorchCodec; this
        # one is still there and the batched GPU decode is what this path is for.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except Exception:  # one bad file fails the whole call (libjpeg and nvjpeg alike)
            pass
        decoded = []
        for data in encoded:
            try:
                decoded.append(decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0])
            except Exception:
                decoded.append(None)
        return decoded


def decode_batch(
    images: Sequence[torch.Tensor], paths: Sequence[str], device: torch.device
) -> tuple[list[torch.Tensor | None], list[tuple[str, Exception]]]:
    """The images of a worker batch as uint8 CHW tensors on ``device``.

    Encoded JPEGs (1-D) are decoded there; one the device decoder cannot read is given to
    :func:`load_image` on the CPU, which either reads it (a JPEG feature the decoder lacks) or
    raises the error the normal path would. Returns the images, None where one failed, and the
    ``(path, error)`` of each failure.
    """
    encoded = [i for i, image in enumerate(images) if image.ndim == 1]
    decoded = decode_jpegs([images[i] for i in encoded], device)
    out: list[torch.Tensor | None] = list(images)
    for i, image in zip(encoded, decoded, strict=True):
        out[i] = image
    failures = []
    for i, image in enumerate(out):
        if image is None:
            try:
                image = F.pil_to_tensor(load_image(paths[i]))
            except Exception as err:
                failures.append((paths[i], err))
                continue
        out[i] = image.to(device, non_blocking=True)
    return out, failures


def crop_box(
    size: Sequence[int], scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, height, width)`` for an image of ``size`` (H, W).

    The same sampling as ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries at a
    random area and log-uniform aspect ratio, else the central crop of the clamped ratio), but
    with all random numbers drawn in one call: ~4 instead of ~24 us per image on a CPU.
    """
    height, width = int(size[0]), int(size[1])
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_area, u_ratio, u_top, u_left in torch.rand(10, 4).tolist():
        target_area = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class DeviceAugment:
    """A train or eval preset of :mod:`alexnet_lit.transforms`, applied to uint8 CHW tensors on
    their device: the geometric steps image by image, ToDtype and Normalize once on the batch.

    It is read from the CPU preset's own ``v2.Compose``, so the two never drift apart. Random
    parameters (crop box, flip, TrivialAugment, erasing) come from torch's global RNG in the
    main process, which ``seed_everything`` seeds.

    Args:
        preset: A ``v2.Compose`` from :func:`~alexnet_lit.transforms.train_transform` or
            :func:`~alexnet_lit.transforms.eval_transform`.
    """

    def __init__(self, preset: v2.Compose):
        steps = [step for step in preset.transforms if not isinstance(step, v2.ToImage)]
        to_float = next(i for i, step in enumerate(steps) if isinstance(step, v2.ToDtype))
        self.per_image = steps[:to_float]
        self.to_float: v2.ToDtype = steps[to_float]
        self.normalize: v2.Normalize = steps[to_float + 1]
        if not isinstance(self.normalize, v2.Normalize):
            raise ValueError(f"expected Normalize after ToDtype in the preset, got {preset}")
        self.after_normalize = steps[to_float + 2 :]  # RandomErasing: per image, own box each

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 ``[C,H,W]`` tensors of any sizes -> normalized float ``[B,C,S,S]``."""
        batch = torch.stack([self._geometry(image) for image in images])
        batch = F.to_dtype(batch, self.to_float.dtype, scale=self.to_float.scale)
        batch = F.normalize(batch, self.normalize.mean, self.normalize.std)
        if self.after_normalize:
            batch = torch.stack([self._after(image) for image in batch])
        return batch

    def _geometry(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.per_image:
            if isinstance(step, v2.RandomResizedCrop):
                top, left, height, width = crop_box(image.shape[-2:], step.scale, step.ratio)
                image = F.resized_crop(
                    image, top, left, height, width, list(step.size), step.interpolation,
                    antialias=step.antialias,
                )  # fmt: skip
            elif isinstance(step, v2.RandomHorizontalFlip):
                if torch.rand(1).item() < step.p:
                    image = F.horizontal_flip(image)
            elif isinstance(step, v2.Resize):
                image = F.resize(
                    image, step.size, step.interpolation, step.max_size, antialias=step.antialias
                )
            elif isinstance(step, v2.CenterCrop):
                image = F.center_crop(image, list(step.size))
            else:  # e.g. TrivialAugmentWide: the transform itself, slower but the same
                image = step(image)
        return image

    def _after(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.after_normalize:
            image = step(image)
        return image
