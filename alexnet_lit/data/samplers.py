"""Samplers: training's shuffle and class-balanced draws, and exact (unpadded) evaluation under
DDP.

All subclass ``DistributedSampler``, so that Lightning calls ``set_epoch`` on them and does not
replace them with its own under DDP. The training samplers pair each index with the seed of its
augmentation, drawn with the order: an image's random crop and flip do not depend on the loader
worker that reads it, so loader workers can persist from epoch to epoch and a fit resumed from a
checkpoint still draws what the uninterrupted fit would.
"""

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Split a dataset across ranks without padding: every sample goes to exactly one rank.

    torch's ``DistributedSampler`` repeats samples until every rank has the same count, so with
    9 validation images on 2 ranks one image is scored twice and accuracy is skewed. Here rank
    ``r`` takes samples ``r, r + world_size, ...``; ranks may get one sample more than others,
    which is fine for evaluation (no gradients are synchronised). torchmetrics then syncs the
    metric states, so ``val/acc`` equals the single-process value.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = math.ceil((len(dataset) - rank) / num_replicas)
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class _TrainingSampler(DistributedSampler):
    """What both training samplers share: a ``DistributedSampler`` over ``size`` indices."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)


class ShuffledSampler(_TrainingSampler):
    """Training's shuffle, each index as ``(index, augmentation seed)`` (see
    :class:`~alexnet_lit.data.datasets.ImageListDataset`).

    With one process it is ``RandomSampler``'s: each epoch's draw is seeded from the process's
    own random stream, which ``RNGStateCheckpoint`` keeps in checkpoints, so a resumed fit draws
    what the uninterrupted one would. With several it is ``DistributedSampler``'s: one
    permutation per epoch from ``seed + epoch``, the same on every process, padded to equal
    shares, every ``num_replicas``-th index from ``rank``.

    Args:
        size: The number of training images.
        num_replicas: The number of processes.
        rank: This process's.
        seed: Seeds the order and the augmentations with several processes.
    """

    def _generator(self) -> torch.Generator:
        if self.num_replicas > 1:
            return super()._generator()
        # As RandomSampler: a seed from the process's stream (a resumed fit's first draw may
        # come before set_epoch gives its epoch, so the epoch cannot seed it).
        return torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = self._generator()
        order = torch.randperm(len(self.dataset), generator=generator)
        order = order.repeat(math.ceil(self.total_size / len(order)))[: self.total_size]  # pad
        return _seeded(order, generator, self.rank, self.num_replicas)


class BalancedSampler(_TrainingSampler):
    """Draws classes equally often (with replacement), each process a disjoint share of one draw.

    Every process draws the same ``len(dataset)`` (rounded up to a multiple of the number of
    processes) indices, weighted by 1 / class count, from a generator seeded by ``seed + epoch``,
    and takes every ``num_replicas``-th one from its rank, each as ``(index, augmentation seed)``.
    """

    def __init__(
        self, targets: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        super().__init__(len(targets), num_replicas, rank, seed)
        counts = torch.bincount(torch.as_tensor(targets))
        self.weights = 1.0 / counts[torch.as_tensor(targets)].double()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = self._generator()
        draw = torch.multinomial(
            self.weights, self.total_size, replacement=True, generator=generator
        )
        return _seeded(draw, generator, self.rank, self.num_replicas)

    def __len__(self) -> int:
        return self.num_samples


def _seeded(
    indices: torch.Tensor, generator: torch.Generator, rank: int, num_replicas: int
) -> Iterator[tuple[int, int]]:
    """``rank``'s share of ``indices``, each with the augmentation seed of its place in the
    epoch's draw: one seed per place, so an image drawn twice gets two crops."""
    seeds = torch.randint(2**62, (len(indices),), generator=generator)
    mine = slice(rank, len(indices), num_replicas)
    return zip(indices[mine].tolist(), seeds[mine].tolist(), strict=True)
