"""Learning-rate schedules that torch does not ship."""

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from alexnet_lit.errors import UserError


class WarmupCosineLR(LRScheduler):
    """Linear warmup to the optimizer's learning rate, then cosine decay; stepped per batch.

    At step ``s`` (0-based) with ``w`` warmup steps and ``T`` total steps, the learning rate is
    ``base_lr * (s + 1) / w`` for ``s < w``, then
    ``base_lr * (r + (1 - r) * (1 + cos(pi * (s - w) / (T - w))) / 2)`` with ``r = min_lr_ratio``.

    Args:
        optimizer: The wrapped optimizer.
        total_steps: Optimizer steps of the whole run. None: the module fills in the trainer's
            ``estimated_stepping_batches``, so it follows epochs, batch size and accumulation.
        warmup_steps: Steps of linear warmup. None: ``warmup_fraction`` of ``total_steps``.
        warmup_fraction: Warmup length as a fraction of ``total_steps`` when ``warmup_steps`` is
            None.
        min_lr_ratio: Final learning rate as a fraction of the optimizer's.
        last_epoch: The index of the last step, for resuming; -1 starts fresh.
    """

    interval = "step"

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int | None = None,
        warmup_steps: int | None = None,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise UserError(
                f"WarmupCosineLR needs total_steps >= 1, got {total_steps}; set "
                "model.lr_scheduler.init_args.total_steps or train through LitAlexNet."
            )
        if warmup_steps is None:
            warmup_steps = round(warmup_fraction * total_steps)
        if not 0 <= warmup_steps < total_steps:
            raise UserError(
                f"WarmupCosineLR: warmup_steps ({warmup_steps}) must be >= 0 and below "
                f"total_steps ({total_steps}); shorten the warmup."
            )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the base learning rate at 0-based ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)  # last_epoch counts steps here
        return [base_lr * factor for base_lr in self.base_lrs]
