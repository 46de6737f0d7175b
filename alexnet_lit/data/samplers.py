"""Samplers: class-balanced draws for training, and exact (unpadded) evaluation under DDP.

Both subclass ``DistributedSampler``, so that Lightning calls ``set_epoch`` on them and does not
replace them with its own under DDP.
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


class BalancedSampler(DistributedSampler):
    """Draws classes equally often (with replacement), each process a disjoint share of one draw.

    Every process draws the same ``len(dataset)`` (rounded up to a multiple of the number of
    processes) indices, weighted by 1 / class count, from a generator seeded by ``seed + epoch``,
    and takes every ``num_replicas``-th one from its rank.
    """

    def __init__(
        self, targets: Sequence[int], num_replicas: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        super().__init__(
            range(len(targets)), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed
        )
        counts = torch.bincount(torch.as_tensor(targets))
        self.weights = 1.0 / counts[torch.as_tensor(targets)].double()

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(
            self.weights, self.total_size, replacement=True, generator=generator
        )
        return iter(draw[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
