"""The NVIDIA DALI backend (``data.backend: dali``): decode, crop, resize, flip and normalize on
the GPU (nvJPEG, and the hardware JPEG decoder where the GPU has one).

It reads the file list and labels of the project's own scan, so hidden files, junk and broken
headers are left out by the same rules as the PIL path, and the data doctor stays the one truth.
DALI pipelines also run on a CPU (``device_id=None``), which is how the tests run it.

Each process owns one shard of each epoch: training draws one permutation of all training images
per epoch (the same on every rank, seeded by ``seed + epoch``) and takes every
``num_shards``-th image from its rank, padded to equal shard sizes so that DDP ranks take the same
number of steps; evaluation splits the images as ``UnpaddedDistributedSampler`` does, so each is
scored exactly once. An image DALI cannot decode is recorded (``skipped_images.csv``) and left
out: in training it is replaced by another image of the shard (the step count stays), in
evaluation the rest of the shard is read without it.
"""

import itertools
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet_lit.data.images import ImageInfo
from alexnet_lit.errors import DataConfigError, first_line

INSTALL = "pip install -e '.[dali]'"
# "Failed to decode sample #2 : /data/train/cat/x.jpg", in DALI's error text.
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (.+?)\s*$", re.MULTILINE)


def require_dali():
    """Import DALI, or explain in one sentence what to install.

    Raises:
        DataConfigError: DALI is missing or cannot load here, or it was built for another CUDA
            major version than torch.
    """
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401 - the torch bridge, needed below
    except Exception as err:  # ImportError, or a library that fails to load on this machine
        raise DataConfigError(
            f"data.backend: dali needs NVIDIA DALI, which cannot be imported here "
            f"({type(err).__name__}: {first_line(err)}); install it with {INSTALL} "
            f"({wheel_name()}, Linux only), or set data.backend: pil."
        ) from err
    dali_major = int(getattr(dali, "__cuda_version__", 0)) // 1000
    torch_major = torch_cuda_major()
    if dali_major and torch_major and dali_major != torch_major:
        raise DataConfigError(
            f"data.backend: dali: the installed DALI {dali.__version__} is built for CUDA "
            f"{dali_major} but this torch for CUDA {torch_major}; install {wheel_name()} "
            f"instead (pip install {wheel_name()})."
        )
    return dali


def dali_refuses(path: str, info: ImageInfo) -> str | None:
    """Why DALI cannot read an image that the scan (and the PIL loader) accepts, or None."""
    if info.format == "GIF":
        return "DALI cannot decode GIF; convert it to PNG, or set data.backend: pil"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # DALI's file reader takes UTF-8 names only
        return (
            "DALI cannot open a file whose name is not UTF-8; rename it, or set data.backend: pil"
        )
    return None


def torch_cuda_major() -> int | None:
    """The CUDA major version this torch was built for, or None for a CPU-only build."""
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def wheel_name() -> str:
    """The DALI wheel that matches this torch: ``nvidia-dali-cuda130`` for CUDA 13."""
    return f"nvidia-dali-cuda{torch_cuda_major() or 13}0"


@dataclass(frozen=True)
class DALIPreset:
    """The preset values of the PIL path, for a DALI pipeline (see :mod:`alexnet_lit.data.presets`).

    ``train`` selects the random crop (``crop_scale``, torchvision's aspect ratios) and flip;
    otherwise the deterministic resize of the short side to ``resize_size`` and center crop.
    """

    image_size: int
    resize_size: int
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True


def build_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    preset: DALIPreset,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    seed: int,
):
    """A DALI pipeline over ``files`` in this order: ``(images, labels)``, images as normalized
    float ``[B, S, S, C]`` on the GPU (``device_id``) or the CPU (``None``)."""
    from nvidia.dali import fn, pipeline_def, types

    on_gpu = device_id is not None
    color = types.GRAY if preset.in_channels == 1 else types.RGB
    mean = [255.0 * m for m in preset.mean]
    std = [255.0 * s for s in preset.std]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipeline():
        encoded, label = fn.readers.file(
            files=list(files), labels=list(labels), name="Reader", pad_last_batch=False
        )
        decoder = "mixed" if on_gpu else "cpu"  # nvJPEG (and the hardware decoder) on a GPU
        if preset.train:
            images = fn.decoders.image_random_crop(
                encoded,
                device=decoder,
                output_type=color,
                random_area=list(preset.crop_scale),
                random_aspect_ratio=[3 / 4, 4 / 3],  # RandomResizedCrop's
                num_attempts=10,
            )
            images = fn.resize(images, resize_x=preset.image_size, resize_y=preset.image_size)
            mirror = fn.random.coin_flip(probability=0.5) if preset.hflip else 0
            crop = None
        else:
            images = fn.decoders.image(encoded, device=decoder, output_type=color)
            images = fn.resize(images, resize_shorter=preset.resize_size)
            mirror, crop = 0, (preset.image_size, preset.image_size)  # centered by default
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="HWC", crop=crop, mean=mean, std=std,
            mirror=mirror,
        )  # fmt: skip
        return images, label

    return pipeline()


class DALILoader:
    """An iterable of ``(images, targets)`` batches of one process's shard, through DALI.

    ``images`` are normalized float ``[B, C, S, S]`` in channels-last memory, ``targets`` long,
    both on the pipeline's device. One epoch per iteration; ``len()`` is its number of batches.

    Args:
        samples: ``(path, class_index)`` of every image of the split (all ranks').
        preset: What the pipeline does to each image.
        batch_size: Images per batch.
        rank: This process's shard, of ``world_size``.
        world_size: The number of processes sharing the split.
        device_id: The CUDA device, or None to run the pipeline on the CPU.
        num_threads: DALI's CPU threads.
        seed: Seeds each epoch's permutation (training) and the pipeline's random crops.
        on_bad_image: Called with ``(path, reason)`` for an image DALI cannot decode.
        epoch: Gives the epoch an iteration reads (the trainer's ``current_epoch``), so that a
            resumed fit reads the order and crops the uninterrupted fit would; None counts the
            iterations from 0.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        preset: DALIPreset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        device_id: int | None = None,
        num_threads: int = 1,
        seed: int = 0,
        on_bad_image: Callable[[str, str], None] = lambda path, reason: None,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        require_dali()
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.preset = preset
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.device_id = device_id
        self.num_threads = max(1, num_threads)
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.epoch = 0  # the next iteration's, unless ``epoch`` gives it
        self.current_epoch = epoch
        self.bad: set[str] = set()

    def shard(self, epoch: int) -> list[tuple[str, int]]:
        """This rank's ``(path, label)`` for ``epoch``, in reading order."""
        if not self.preset.train:  # each image exactly once, as UnpaddedDistributedSampler
            mine = self.samples[self.rank :: self.world_size]
            return [sample for sample in mine if sample[0] not in self.bad]
        order = list(range(len(self.samples)))
        random.Random(self.seed + epoch).shuffle(order)
        per_rank = math.ceil(len(order) / self.world_size)
        # Pad, as DistributedSampler does, repeating the order as often as it takes.
        order = list(itertools.islice(itertools.cycle(order), per_rank * self.world_size))
        return [self.samples[i] for i in order[self.rank :: self.world_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.shard(self.epoch)) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch if self.current_epoch is None else self.current_epoch()
        self.epoch = epoch + 1
        remaining = self._without_bad(self.shard(epoch))
        seed = self.seed + 1000 * epoch + self.rank
        while remaining:
            try:
                for images, targets in self._run(remaining, seed):
                    remaining = remaining[len(targets) :]
                    yield images, targets
                return
            except RuntimeError as err:
                path = _failed_path(err)
                if path is None or path in self.bad:
                    raise
                self.bad.add(path)
                self.on_bad_image(path, "DALI cannot decode it")
                remaining = self._without_bad(remaining)
                seed += 1

    def _without_bad(self, shard: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Training keeps its step count: each bad image is replaced by a good one of the shard."""
        good = [sample for sample in shard if sample[0] not in self.bad]
        if not self.preset.train or len(good) == len(shard) or not good:
            return good
        spare = random.Random(self.seed).choice(good)
        return [sample if sample[0] not in self.bad else spare for sample in shard]

    def _run(self, shard: list[tuple[str, int]], seed: int):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        files, labels = zip(*shard, strict=True)
        pipeline = build_pipeline(
            files, labels, self.preset, self.batch_size, self.device_id, self.num_threads, seed
        )
        iterator = DALIGenericIterator(
            pipeline, ["images", "labels"], reader_name="Reader",
            last_batch_policy=LastBatchPolicy.PARTIAL,
        )  # fmt: skip
        for (batch,) in iterator:
            # [B, S, S, C] seen as [B, C, S, S]: channels-last memory, no copy.
            images = batch["images"].permute(0, 3, 1, 2)
            yield images, batch["labels"].view(-1).long()


def _failed_path(err: BaseException) -> str | None:
    found = _FAILED_SAMPLE.findall(str(err))
    return found[-1] if found else None
