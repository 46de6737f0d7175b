"""Data parallel helpers: an evaluation sampler that counts every sample exactly once."""

import math
from collections.abc import Iterator

from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


class UnpaddedDistributedSampler(DistributedSampler):
    """Split a dataset across ranks without padding: every sample goes to exactly one rank.

    torch's ``DistributedSampler`` repeats samples until every rank has the same count, so with
    9 validation images on 2 ranks one image is scored twice and accuracy is skewed. Here rank
    ``r`` takes samples ``r, r + world_size, ...``; ranks may get one sample more than others,
    which is fine for evaluation (no gradients are synchronised). torchmetrics then syncs the
    metric states, so ``val/acc`` equals the single-process value.

    It subclasses ``DistributedSampler`` so that Lightning does not replace it with its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = math.ceil((len(dataset) - rank) / num_replicas)
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))
