"""What an evaluation epoch measures, collected once: its logits, targets and confusion matrix
(:class:`EpochOutputs`), and the expected calibration error of its confidences.

The LightningModule fills one :class:`EpochOutputs` per evaluation stage; the evaluation
callbacks (reports, pictures, temperature scaling) all read that one result, so an epoch's
logits are gathered across processes once and its confusion matrix is counted once.
"""

from typing import NamedTuple

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.utilities import dim_zero_cat

# Confidence bins of the expected calibration error and the reliability diagram.
ECE_BINS = 15


def expected_calibration_error(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> float:
    """ECE (15 bins, L1) of ``softmax(logits / temperature)`` against integer ``targets``."""
    if len(targets) == 0:
        return float("nan")
    probs = (logits.float() / temperature).softmax(dim=1)
    ece = multiclass_calibration_error(probs, targets, logits.shape[1], n_bins=ECE_BINS, norm="l1")
    return float(ece)


class Evaluated(NamedTuple):
    """One evaluation epoch, from every process, on the CPU."""

    logits: torch.Tensor  # [N, num_classes], float32
    targets: torch.Tensor  # [N], class indices
    confusion: np.ndarray  # [num_classes, num_classes]: rows true, columns predicted


class EpochOutputs(Metric):
    """An evaluation epoch's logits and targets, gathered from every process when computed.

    A torchmetrics ``Metric``: its states are concatenated across processes by torchmetrics'
    own sync (which handles ranks with different numbers of images), once, on the first
    :meth:`compute` after the last update (later calls return the cached result). Its states
    are not part of the module's ``state_dict``.

    Args:
        num_classes: The width of the logits.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if len(targets):  # empty when every image of the batch was unreadable
            # Flat float32 states: a rank without a single image syncs as an empty 1-D float
            # tensor (torchmetrics' stand-in), which only concatenates with states of that shape.
            self.logits.append(logits.detach().float().flatten())
            self.targets.append(targets.detach().float())

    def compute(self) -> Evaluated:
        logits = _concatenated(self.logits).cpu().view(-1, self.num_classes)
        targets = _concatenated(self.targets).cpu().long()
        index = targets * self.num_classes + logits.argmax(dim=1)
        counts = torch.bincount(index, minlength=self.num_classes**2)
        confusion = counts.view(self.num_classes, self.num_classes).numpy()
        return Evaluated(logits, targets, confusion)


def _concatenated(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """A list state (before a sync) or the tensor a sync leaves, as one flat tensor."""
    if isinstance(state, list) and not state:
        return torch.empty(0)
    return dim_zero_cat(state)
